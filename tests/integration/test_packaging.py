"""`bentoml build` with the project's bentofile.yaml, offline, and what the built Bento holds.

The build runs as a user runs it (the CLI, in the project folder) against the session's model
store of random-init models, with the package index and the model hub made unreachable. The Bento
is then read on disk: models, sources, Python requirements and the generated Dockerfile.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import tomllib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from clip_service.bento_image import CUDA_BASE_IMAGE
from clip_testkit.sample_images import b64, jpeg_bytes
from clip_testkit.server import ROOT, ServerProcess, model_folder
from tests.local_http import local_server

pytestmark = pytest.mark.integration

BENTOFILE: dict[str, Any] = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
PYPROJECT: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())
SINGLE = "/evaluator/v1/evaluation/single"
STORE_NAMES = {"ViT-B-32": "clip-vit-b-32", "ViT-L-14": "clip-vit-l-14"}


@dataclass(frozen=True)
class Build:
    folder: Path  # the built Bento in the store
    output: str  # what `bentoml build` printed, stdout and stderr


def build_bento(bentoml_home: Path, env: dict[str, str] | None = None) -> Build:
    """`bentoml build` in the project folder, as a user runs it."""
    build_env = {
        **os.environ,
        "BENTOML_HOME": str(bentoml_home),
        "HF_HUB_OFFLINE": "1",
        # Any package resolution or download fails: the build must not need the index.
        "UV_OFFLINE": "1",
        "PIP_NO_INDEX": "1",
    }
    build_env.pop("CLIP_MODELS", None)  # the default unless the test says otherwise
    build_env.update(env or {})
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "--output", "tag"],
        cwd=ROOT,
        env=build_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"bentoml build failed:\n{result.stdout}\n{result.stderr}"
    tag = re.search(r"__tag__:(\S+):(\S+)", result.stdout)
    assert tag, result.stdout
    print(f"bentoml build: {tag[1]}:{tag[2]} in {time.monotonic() - started:.1f} s")
    return Build(bentoml_home / "bentos" / tag[1] / tag[2], result.stdout + result.stderr)


@pytest.fixture(scope="module")
def build(l14_home: Path) -> Iterator[Build]:
    built = build_bento(l14_home)
    yield built
    shutil.rmtree(built.folder)  # with the model copies `bentoml export` puts there (GBs)


@pytest.fixture(scope="module")
def bento(build: Build) -> Path:
    return build.folder


@pytest.fixture(scope="module")
def b32_bento(l14_home: Path) -> Iterator[Path]:
    """Built with CLIP_MODELS=ViT-B-32: the Bento the export and drain tests use (1.7 GB of
    ViT-L-14 weights less to copy)."""
    folder = build_bento(l14_home, {"CLIP_MODELS": "ViT-B-32"}).folder
    yield folder
    shutil.rmtree(folder)


def test_build_prints_no_warnings(build: Build) -> None:
    """The configuration is one BentoML applies as written: a warning means an option ignored
    (or a deprecated one), which a user would have to read up on."""
    warnings = [line for line in build.output.splitlines() if re.search(r"warn", line, re.I)]
    assert not warnings, build.output


def bento_info(folder: Path) -> dict[str, Any]:
    return yaml.safe_load((folder / "bento.yaml").read_text())


def served_model_tags(folder: Path) -> dict[str, set[str]]:
    """BentoML service name -> the model tags the Bento records for it."""
    return {
        service["name"]: {model["tag"] for model in service["models"]}
        for service in bento_info(folder)["services"]
    }


def saved_tag(bentoml_home: Path, store_name: str) -> str:
    return f"{store_name}:{model_folder(bentoml_home, store_name).name}"


def test_bento_records_both_models_at_their_saved_versions(bento: Path, l14_home: Path) -> None:
    expected = {saved_tag(l14_home, name) for name in STORE_NAMES.values()}
    # Scorer holds the weights; Evaluator reads each model's preprocessing from the same entries.
    assert served_model_tags(bento) == {"clip-scorer": expected, "clip-evaluator": expected}
    info = bento_info(bento)
    assert info["entry_service"] == "clip-evaluator"
    assert info["labels"] == BENTOFILE["labels"]


def test_exported_bento_carries_the_weights(
    b32_bento: Path, l14_home: Path, tmp_path: Path
) -> None:
    """What leaves this machine (`bentoml export`; `push` and `containerize` bundle the same
    models) holds the store entry of each model it serves, byte for byte the saved files."""
    archive = tmp_path / "clip-score.tar"  # uncompressed: xz over GBs of weights takes minutes
    tag = f"{b32_bento.parent.name}:{b32_bento.name}"
    try:
        subprocess.run(
            [sys.executable, "-m", "bentoml", "export", tag, str(archive)],
            env={**os.environ, "BENTOML_HOME": str(l14_home)},
            check=True,
            capture_output=True,
            timeout=600,
        )
        with tarfile.open(archive) as tar:
            members = {member.name.removeprefix("./"): member for member in tar.getmembers()}
            exported = {name.split("/")[1] for name in members if name.startswith("models/")}
            assert exported == {STORE_NAMES["ViT-B-32"]}
            for store_name in exported:
                saved = model_folder(l14_home, store_name)
                inside = f"models/{store_name}/{saved.name}"
                weights = members[f"{inside}/open_clip_model.safetensors"]
                assert weights.size == (saved / "open_clip_model.safetensors").stat().st_size
                for small in ("clip_model.json", "open_clip_config.json"):
                    extracted = tar.extractfile(members[f"{inside}/{small}"])
                    assert extracted is not None
                    assert extracted.read() == (saved / small).read_bytes()
    finally:
        archive.unlink(missing_ok=True)  # 2+ GB; pytest keeps old temp folders around


def test_bento_source_is_the_service_code_only(bento: Path) -> None:
    shipped = {str(p.relative_to(bento / "src")) for p in (bento / "src").rglob("*") if p.is_file()}
    code = {
        str(path.relative_to(ROOT))
        for folder in ("clip_runtime", "clip_service", "scripts", "web")
        for path in (ROOT / folder).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }
    # BentoML adds the resolved build configuration as src/bentofile.yaml.
    assert shipped == code | {"service.py", "bentofile.yaml"}
    assert "clip_service/bento_image.py" in shipped
    assert not any(
        part == "tests" or part.startswith(("test_", "conftest")) or part == "__pycache__"
        for path in shipped
        for part in Path(path).parts
    )


def test_python_requirements_are_the_project_dependencies(bento: Path) -> None:
    # bentofile.yaml lists the same (tests/test_dependencies.py); here: what the Bento got.
    dependencies = PYPROJECT["project"]["dependencies"]
    lines = (bento / "env/python/requirements.txt").read_text().splitlines()
    requirements = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    # Exactly the declared ranges and pins: nothing locked (that would need the index).
    assert requirements == set(dependencies)
    assert "opentelemetry-exporter-otlp-proto-http==1.45.1" in requirements


def test_dockerfile_builds_the_cuda_image_with_the_env_defaults(bento: Path) -> None:
    dockerfile = (bento / "env/docker/Dockerfile").read_text()
    assert CUDA_BASE_IMAGE.startswith("nvidia/cuda:")
    assert re.findall(r"^FROM (\S+)", dockerfile, re.MULTILINE) == [CUDA_BASE_IMAGE]

    # The service's image (clip_service/bento_image.py): its system packages and Python version.
    installs = re.findall(r"^RUN apt-get install (.*)$", dockerfile, re.MULTILINE)
    assert any({"python3-pip", "zlib1g"} <= set(line.split()) for line in installs)
    assert "uv venv --python 3.11 /app/.venv" in dockerfile
    assert "pip install -r $BENTO_PATH/env/python/requirements.txt" in dockerfile
    assert re.search(r"^EXPOSE 3000$", dockerfile, re.MULTILINE)
    assert re.search(r"^USER bentoml$", dockerfile, re.MULTILINE)
    entrypoint = "/home/bentoml/bento/env/docker/entrypoint.sh"
    assert f'ENTRYPOINT [ "{entrypoint}" ]' in dockerfile
    assert (bento / "env/docker/entrypoint.sh").is_file()

    build_args = dict(re.findall(r"^ARG (\w+)=(.*)$", dockerfile, re.MULTILINE))
    for env in BENTOFILE["envs"]:
        assert build_args[env["name"]].strip("'") == env["value"]
        assert f"ENV {env['name']}=${env['name']}" in dockerfile
    assert build_args["HF_HUB_OFFLINE"] == "1"  # the weights are inside: never the model hub


def test_bento_carries_only_the_models_clip_models_names(b32_bento: Path, l14_home: Path) -> None:
    only_b32 = {saved_tag(l14_home, STORE_NAMES["ViT-B-32"])}
    assert served_model_tags(b32_bento) == {"clip-scorer": only_b32, "clip-evaluator": only_b32}


def bento_venv(requirements: Path) -> Path:
    """A virtualenv with exactly the packages of the Bento's ``requirements.txt``, made with pip
    from those requirements alone. Kept between runs under the user's cache, keyed by the
    requirements' sha256 (any change makes a new one): creating it costs minutes (5.4 GB with
    CUDA torch), and reusing it is what pip's own cache would do for the downloads."""
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "clip-score"
    venv = cache / f"bento-venv-{digest}"
    if (venv / ".complete").is_file():
        return venv
    shutil.rmtree(venv, ignore_errors=True)  # a run that was cut short
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    started = time.monotonic()
    install = subprocess.run(
        [*(str(venv / "bin" / "python"), "-m", "pip", "install", "-q"), "-r", str(requirements)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if install.returncode != 0:
        shutil.rmtree(venv, ignore_errors=True)
    assert install.returncode == 0, install.stderr[-3000:]
    print(f"venv from the Bento's requirements: {time.monotonic() - started:.1f} s")
    (venv / ".complete").write_text(requirements.read_text())
    return venv


@dataclass(frozen=True)
class DrainOutcome:
    returncode: int
    exited_s: float  # from the SIGTERM
    answers: list[str]  # the requests that can finish: status codes, or the error's name
    stuck_answer: str  # the request held by an image URL that never finishes


def serve_bento_from_store(
    bento: Path, bentoml_home: Path, folder: Path, python: Path, env: dict[str, str]
) -> ServerProcess:
    """``bentoml serve`` of the Bento by its tag, run by ``python`` in ``folder`` (outside the
    source tree), on a home of its own that sees the store's models and Bentos."""
    server = ServerProcess(
        bentoml_home,
        folder / "serve.log",
        {"CLIP_MODELS": "ViT-B-32", **env},
        target=f"{bento.parent.name}:{bento.name}",
        python=python,
        cwd=folder,
    )
    (server.home / "bentos").symlink_to(bentoml_home / "bentos", target_is_directory=True)
    return server


def post_single(url: str, body: dict[str, str]) -> str:
    """The status code, or the transport error's name when the connection is cut."""
    try:
        response = httpx.post(f"{url}{SINGLE}", json=body, timeout=120)
    except httpx.TransportError as exc:  # cut at the bound: the connection closes
        return type(exc).__name__
    return str(response.status_code)


def sigterm_under_load(
    server: ServerProcess, stuck_body: dict[str, str], bound_s: float
) -> DrainOutcome:
    """SIGTERM while four scoring requests and ``stuck_body`` are in flight, and what each got."""
    image = b64(jpeg_bytes(3, 160, 120))
    with ThreadPoolExecutor(5) as pool:
        stuck = pool.submit(post_single, server.url, stuck_body)
        scored = [
            pool.submit(post_single, server.url, {"image": image, "text": f"cat {i}"})
            for i in range(4)
        ]
        time.sleep(1.0)  # all accepted
        assert server.process is not None
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        returncode = server.process.wait(bound_s + 60)
        exited_s = time.monotonic() - signalled
        answers = [future.result() for future in scored]
        return DrainOutcome(returncode, exited_s, answers, stuck.result())


def test_bento_from_the_store_drains_within_its_own_bound(
    b32_bento: Path, bentoml_home: Path, tmp_path: Path
) -> None:
    """The built Bento, served from the store outside the source tree with the packages of its
    own requirements.txt, exits within CLIP_SHUTDOWN_TIMEOUT_S of a SIGTERM under load (no
    `--timeout-graceful-shutdown`): requests that can finish are answered, and one stuck on an
    image URL that never finishes is cut at the bound instead of holding the server.

    Costly the first time (on the shared 2-core box: pip install of the requirements 105-134 s,
    5.4 GB with CUDA torch; serve start about 60 s; exit 22 s after SIGTERM with a 15 s
    bound; about 6 minutes in all). The venv is kept per requirements hash after that."""
    venv = bento_venv(b32_bento / "env" / "python" / "requirements.txt")
    release = threading.Event()

    def stalled(handler: BaseHTTPRequestHandler) -> None:  # headers, then nothing for minutes
        handler.send_response(200)
        handler.send_header("Content-Length", "100000")
        handler.end_headers()
        release.wait(300)

    bound_s = 8  # four requests finish well within it (3.5 s each on this box under load 12)
    with local_server() as images_host:
        images_host.routes["/stalled.jpg"] = stalled
        env = {
            "CLIP_SHUTDOWN_TIMEOUT_S": str(bound_s),
            "CLIP_URL_ALLOWED_HOSTS": f"127.0.0.1:{images_host.port}",
            "CLIP_URL_READ_TIMEOUT_S": "600",
            "CLIP_URL_TOTAL_TIMEOUT_S": "600",
        }
        server = serve_bento_from_store(
            b32_bento, bentoml_home, tmp_path, venv / "bin" / "python", env
        )
        server.start()
        try:
            stuck_body = {"image": images_host.url("/stalled.jpg"), "text": "a cat"}
            outcome = sigterm_under_load(server, stuck_body, bound_s)
        finally:
            release.set()
            server.stop()
    log = server.log_path.read_text(errors="replace")
    print(
        f"exit {outcome.returncode} {outcome.exited_s:.1f} s after SIGTERM; "
        f"answers {outcome.answers}, stuck {outcome.stuck_answer}"
    )
    cut = log.index("timeout graceful shutdown exceeded")  # uvicorn's own line: the bound held
    assert outcome.exited_s < bound_s + 20  # the stuck fetch alone would hold it 600 s
    assert outcome.answers == ["200"] * 4, log[-3000:]
    # Cut at the bound: BentoML's TimeoutMiddleware runs the app in a future of its own, so the
    # cancellation reaches uvicorn, not our middleware, and uvicorn answers a plain 500.
    assert outcome.stuck_answer in ("500", "RemoteProtocolError", "ReadError"), outcome.stuck_answer
    assert "Traceback" not in log[:cut], log[:cut][-3000:]
