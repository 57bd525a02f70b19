"""Start `bentoml serve` as a subprocess on a free port and wait until /readyz says 200."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
GRACEFUL_SHUTDOWN_S = 20
# A Kubernetes-like probe: a client timeout of 2 s, every 0.5 s while the server starts.
PROBE_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Probe:
    """One probe sent while the server started: what, when, and what came of it."""

    path: str
    at_s: float  # since `serve` was started
    outcome: str  # "refused" (no socket yet), "timeout", or the HTTP status
    took_s: float


def probe(url: str, path: str, started: float) -> Probe:
    sent = time.monotonic()
    try:
        outcome = str(httpx.get(f"{url}{path}", timeout=PROBE_TIMEOUT_S).status_code)
    except httpx.ConnectError:
        outcome = "refused"
    except httpx.TimeoutException:
        outcome = "timeout"
    except httpx.HTTPError as error:
        outcome = type(error).__name__
    return Probe(path, sent - started, outcome, time.monotonic() - sent)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def save_random_init_models(
    bentoml_home: Path, models: list[str], seed: int = 0, options: Sequence[str] = ()
) -> None:
    """The project's own script, exactly as a user runs it, into ``bentoml_home``; ``options``
    are more of its arguments (``--config``, ``--tokenizer``)."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.save_models",
            "--models",
            *models,
            "--random-init",
            "--seed",
            str(seed),
            *options,
        ],
        cwd=ROOT,
        env={**os.environ, "BENTOML_HOME": str(bentoml_home)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        raise RuntimeError(f"save_models.py {models} failed:\n{result.stderr[-3000:]}")


def model_folder(bentoml_home: Path, store_name: str) -> Path:
    """The newest saved version of a model (what `name:latest` resolves to)."""
    latest = (bentoml_home / "models" / store_name / "latest").read_text().strip()
    return bentoml_home / "models" / store_name / latest


def own_home(shared_home: Path, parent: Path) -> Path:
    """A BENTOML_HOME of this server's own that sees the shared model store.

    `bentoml serve` keeps its Prometheus multiprocess files in $BENTOML_HOME and wipes them at
    start: two servers on one home would erase each other's metrics."""
    home = Path(tempfile.mkdtemp(prefix="bentoml-home-", dir=parent))
    (shared_home / "models").mkdir(parents=True, exist_ok=True)
    (home / "models").symlink_to((shared_home / "models").resolve(), target_is_directory=True)
    return home


class ServerProcess:
    def __init__(
        self,
        bentoml_home: Path,
        log_path: Path,
        env: dict[str, str] | None = None,
        target: str = "service:Evaluator",
        python: Path = Path(sys.executable),
        cwd: Path = ROOT,
        port: int | None = None,
    ) -> None:
        """Serve ``target`` (the source tree's service, or a Bento tag from ``cwd``) with the
        ``bentoml`` of ``python``'s environment, on ``port`` (default: a free one)."""
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.home = own_home(bentoml_home, log_path.parent)
        self._env = {
            **os.environ,
            "BENTOML_HOME": str(self.home),
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            # The service's own drain bound (no --timeout-graceful-shutdown: what a Bento gets)
            "CLIP_SHUTDOWN_TIMEOUT_S": str(GRACEFUL_SHUTDOWN_S),
            # One HTTP worker unless asked: the suite's limits and metrics checks count per
            # worker, and the shared test box has few cores.
            "CLIP_HTTP_WORKERS": "1",
            **(env or {}),
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_probes: list[Probe] = []
        self.launched_at = 0.0
        self.target, self.python, self.cwd = target, python, cwd

    def launch(self) -> ServerProcess:
        """Start `bentoml serve` and return at once (see ``wait_ready``)."""
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [
                str(self.python),
                "-m",
                "bentoml",
                "serve",
                self.target,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            cwd=self.cwd,
            env=self._env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # so stop() can signal the whole process group
        )
        self.launched_at = time.monotonic()
        return self

    def is_ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout_s: float = 300) -> ServerProcess:
        """Return once /readyz says 200, probing as Kubernetes would and recording every probe
        (``startup_probes``); raise (with the log) when the server exits or times out."""
        assert self.process is not None, "launch() first"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log()}")
            ready = probe(self.url, "/readyz", self.launched_at)
            self.startup_probes.append(ready)
            if ready.outcome == "200":
                return self
            if ready.outcome == "503":  # answering but not ready: health must say so, at once
                self.startup_probes.append(probe(self.url, "/evaluator/health", self.launched_at))
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout_s}s:\n{self.log()}")

    def start(self, timeout_s: float = 300) -> ServerProcess:
        return self.launch().wait_ready(timeout_s)

    def wait_for_log(self, needle: str, timeout_s: float = 120) -> bool:
        """Poll the log until it holds ``needle`` (True), or the server turns ready, exits, or
        ``timeout_s`` passes (False): a refusal is seen as soon as it is logged."""
        assert self.process is not None, "launch() first"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if needle in self.log_path.read_text(errors="replace"):
                return True
            if self.process.poll() is not None or self.is_ready():
                return needle in self.log_path.read_text(errors="replace")
            time.sleep(0.5)
        return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def workers(self) -> list[psutil.Process]:
        """The worker processes (circus starts each in its own session, outside our group)."""
        if self.process is None or self.process.poll() is not None:
            return []
        return psutil.Process(self.process.pid).children(recursive=True)

    def stop(self, timeout_s: float = 30) -> int | None:
        """SIGTERM to the arbiter (it stops the workers gracefully); SIGKILL for all after
        ``timeout_s``, workers included, so that no orphan keeps a port or memory."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        workers = self.workers()
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            for worker in workers:
                with contextlib.suppress(psutil.NoSuchProcess):
                    worker.kill()
            os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait(10)


@contextlib.contextmanager
def launched_together(servers: list[ServerProcess]) -> Iterator[list[ServerProcess]]:
    """Launch every server at once, so that their start-ups overlap (each test then waits for
    its own with ``wait_ready``); stop them all at the end."""
    try:
        for server in servers:
            server.launch()
        yield servers
    finally:
        for server in servers:
            server.stop()


def run_load_test(
    url: str, reports: Path, name: str, *options: str, users: int = 3, run_time: str = "20s"
) -> subprocess.CompletedProcess[str]:
    """`python -m load_tests.run` against ``url`` as a user runs it (CLIP_API_KEY unset unless
    ``options`` pass --api-key)."""
    env = {k: v for k, v in os.environ.items() if k != "CLIP_API_KEY"}
    command = [sys.executable, "-m", "load_tests.run", "--url", url, "--reports", str(reports)]
    command += ["--name", name, "--users", str(users), "--spawn-rate", str(users)]
    return subprocess.run(
        [*command, "--run-time", run_time, *options],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
