"""clip-eval end to end with the local engine (a tiny random-init model), resuming, outputs,
summary, plot, image references, error messages, and the remote engine's retry logic."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import http.server
import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
from bentoml.exceptions import BentoMLException
from PIL import Image

from clip_eval import cli
from clip_eval.cli_errors import ClipEvalError
from clip_eval.engines.local import LocalScorer
from clip_eval.engines.remote import (
    BatchRequester,
    RetryPolicy,
    generated_client,
    parse_retry_after,
    record_retry_after,
)
from clip_eval.image_cells import ImageLoader, LoaderConfig
from clip_eval.output import OutputFile, state_path
from clip_eval.pipeline import RowAligner
from clip_eval.records import PairOutcome, result_columns
from clip_eval.summary import summarize
from clip_runtime.errors import ClipError
from clip_testkit.sample_images import jpeg_bytes
from tests.cli_helpers import (
    Dataset,
    allow_host,
    check_output,
    cli_command,
    cli_env,
    make_dataset,
    read_table,
    write_table,
)


@contextlib.contextmanager
def serve(folder: Path, delay_s: float = 0.0) -> Iterator[str]:
    """A plain HTTP server over a folder on 127.0.0.1, answering after ``delay_s``."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            time.sleep(delay_s)
            super().do_GET()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(folder))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def image_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    folder = tmp_path_factory.mktemp("served")
    with serve(folder) as url:
        yield url, folder


def run_cli(*args: str | Path) -> int:
    return cli.main([str(arg) for arg in args])


def tiny_args(model_dir: Path) -> list[str]:
    return ["--model", "tiny", "--model-dir", str(model_dir), "--quiet"]


@pytest.mark.parametrize(
    ("input_format", "output_format"),
    [("csv", "csv"), ("jsonl", "parquet"), ("parquet", "jsonl")],
)
def test_local_engine_scores_every_row(
    tmp_path: Path,
    tiny_model_dir: Path,
    image_server: tuple[str, Path],
    input_format: str,
    output_format: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, served = image_server
    dataset = make_dataset(served / input_format, input_format, url=f"{url}/{input_format}")
    output = tmp_path / f"scores.{output_format}"
    code = run_cli(
        dataset.path,
        "-o",
        output,
        "--batch-size",
        "4",
        *allow_host(url),
        *tiny_args(tiny_model_dir),
    )
    assert code == 0
    check_output(output, dataset, tiny_model_dir)
    state = json.loads(state_path(output).read_text())
    assert state["complete"] is True and state["rows_done"] == len(dataset.frame)
    assert not output.with_name(output.name + ".parts").exists()
    printed = capsys.readouterr().out
    failed = len(dataset.errors)
    assert f"tiny: {len(dataset.frame)} pairs, {len(dataset.frame) - failed} scored" in printed
    assert "failed image_not_found: 1" in printed and "failed empty_text: 1" in printed


@pytest.mark.parametrize("output_format", ["csv", "parquet"])
def test_resume_after_interrupt_rescores_nothing(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, output_format: str
) -> None:
    dataset = make_dataset(tmp_path / "data")
    output = tmp_path / f"scores.{output_format}"
    args = [dataset.path, "-o", output, "--batch-size", "3", *tiny_args(tiny_model_dir)]
    scored: list[int] = []
    real_load = LocalScorer.load

    def counting_load(self: LocalScorer, pairs: list[Any]) -> Any:
        scored.append(len(pairs))
        return real_load(self, pairs)

    monkeypatch.setattr(LocalScorer, "load", counting_load)
    real_append = OutputFile.append
    appends = 0

    def append_then_interrupt(
        self: OutputFile, rows: pd.DataFrame, input_rows: int, embeddings: Any = None
    ) -> None:
        nonlocal appends
        real_append(self, rows, input_rows, embeddings)
        appends += 1
        if appends == 2:  # what Ctrl-C does between two batches
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(OutputFile, "append", append_then_interrupt)
        assert run_cli(*args) == 130
    state = json.loads(state_path(output).read_text())
    assert state["rows_done"] == 6 and state["complete"] is False

    assert run_cli(*args) == 2  # an existing output is never silently replaced
    scored.clear()
    assert run_cli(*args, "--resume") == 0
    assert sum(scored) == len(dataset.frame) - 6  # only the rows not yet written
    check_output(output, dataset, tiny_model_dir)

    scored.clear()
    assert run_cli(*args, "--resume") == 0  # complete: nothing to do
    assert scored == []


def test_killed_run_loses_nothing_and_resumes(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL mid-run (no cleanup at all), plus a torn last line, then --resume."""
    dataset = make_dataset(tmp_path / "data", "jsonl")
    output = tmp_path / "scores.jsonl"
    args = ["-o", str(output), "--batch-size", "1", *tiny_args(tiny_model_dir)]
    state_file = state_path(output)
    scored: list[int] = []
    real_load = LocalScorer.load

    def counting_load(self: LocalScorer, pairs: list[Any]) -> Any:
        scored.append(len(pairs))
        return real_load(self, pairs)

    monkeypatch.setattr(LocalScorer, "load", counting_load)
    # Images from a server that takes 0.2 s per image: the run cannot finish between seeing
    # 3 rows done and the kill, however fast the machine.
    with serve(tmp_path / "data", delay_s=0.2) as url:
        images = [str(image) for image in dataset.frame["image"]]
        frame = dataset.frame.assign(
            image=[f"{url}/{image}" if image.startswith("img/") else image for image in images]
        )
        write_table(frame, dataset.path)
        errors = {**dataset.errors, images.index("img/missing.jpg"): "url_fetch_failed"}
        args = [*args, *allow_host(url)]
        dataset = Dataset(dataset.path, frame, dataset.images, errors)
        process = subprocess.Popen(
            cli_command(str(dataset.path), *args),
            env=cli_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if state_file.exists() and json.loads(state_file.read_text())["rows_done"] >= 3:
                break
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait(30)
        assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
        state = json.loads(state_file.read_text())
        assert 3 <= state["rows_done"] < len(dataset.frame)
        before = output.read_bytes()[: state["output_bytes"]]
        with output.open("ab") as handle:  # what a kill in the middle of a write leaves
            handle.write(b'{"id": 99, "image": "img/')

        assert run_cli(dataset.path, *args, "--resume") == 0
    assert sum(scored) == len(dataset.frame) - state["rows_done"]
    assert output.read_bytes().startswith(before)  # what was written before stays as it was
    check_output(output, dataset, tiny_model_dir)


def test_plot_is_a_png_histogram(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dataset = make_dataset(tmp_path / "data")
    plot = tmp_path / "hist.png"
    code = run_cli(
        dataset.path, "-o", tmp_path / "s.csv", "--plot", plot, *tiny_args(tiny_model_dir)
    )
    assert code == 0
    # The tiny model is random-init: the run says so in words, not only with zero scores.
    assert "UNTRAINED weights (random-init)" in capsys.readouterr().out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.size == (1200, 500)
        # Not a blank canvas: the bars and labels are drawn in several colours.
        assert len(image.convert("RGB").getcolors(1 << 16) or []) > 10


def test_models_from_the_bentoml_store_one_row_per_model(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """Two models resolved by name from a BENTOML_HOME (the tiny entry saved under both store
    names), run as the console script would be: one output row per input row and model."""
    import bentoml
    from bentoml._internal.models.model import ModelStore

    home = tmp_path / "bentoml"
    store = ModelStore(home / "models")
    for name in ("clip-vit-b-32", "clip-vit-l-14"):
        with bentoml.models.create(name, module="clip_runtime", _model_store=store) as saved:
            for file in tiny_model_dir.iterdir():
                (Path(saved.path) / file.name).write_bytes(file.read_bytes())
    dataset = make_dataset(tmp_path / "data")
    output = tmp_path / "scores.parquet"
    result = subprocess.run(
        cli_command(
            str(dataset.path),
            "-o",
            str(output),
            "--model",
            "ViT-B-32",
            "--model",
            "ViT-L-14",
            "--quiet",
        ),
        env=cli_env(BENTOML_HOME=str(home)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    frame = read_table(output)
    assert list(frame["model"]) == ["ViT-B-32", "ViT-L-14"] * len(dataset.frame)
    assert list(frame["id"].astype(int)) == [i for i in dataset.frame["id"] for _ in range(2)]
    b32, l14 = frame[frame["model"] == "ViT-B-32"], frame[frame["model"] == "ViT-L-14"]
    assert list(b32["cosine"]) == list(l14["cosine"])  # the same weights under both names
    pairs = len(dataset.frame)
    assert (
        f"ViT-B-32: {pairs} pairs" in result.stdout and f"ViT-L-14: {pairs} pairs" in result.stdout
    )


def test_rows_and_outcomes_are_lined_up_whatever_the_batch_sizes() -> None:
    """Engines (Ray above all) hand back outcomes in batches unrelated to the row chunks; with
    two models a batch may even end in the middle of a row."""
    frame = pd.DataFrame({"id": range(7)})
    chunks = iter([frame.iloc[0:3], frame.iloc[3:6], frame.iloc[6:7]])
    aligner = RowAligner(chunks, ["A", "B"])
    outcomes = [PairOutcome.scored(model, row / 10) for row in range(7) for model in ("A", "B")]
    written = []
    for start, stop in [(0, 1), (1, 6), (6, 7), (7, 14)]:  # 1, 5, 1 and 7 outcomes
        written.extend(aligner.add(outcomes[start:stop]))
    assert [done for _, done, _ in written] == [3, 3, 1]  # every row once, only when complete
    rows = pd.concat([rows for rows, _, _ in written], ignore_index=True)
    assert list(rows["id"]) == [i for i in range(7) for _ in range(2)]
    assert list(rows["model"]) == ["A", "B"] * 7
    assert list(rows["cosine"]) == pytest.approx([i / 10 for i in range(7) for _ in range(2)])
    assert not aligner.unmatched()
    extra = [
        PairOutcome.scored("A", 0.0),
        PairOutcome.scored("B", 0.0),
    ]  # a row more than the input
    assert list(aligner.add(extra)) == [] and aligner.unmatched()


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_empty_input_gives_an_empty_table_with_the_columns(
    tmp_path: Path, tiny_model_dir: Path, suffix: str
) -> None:
    (tmp_path / "in.csv").write_text("image,caption,id\n")
    output = tmp_path / f"out.{suffix}"
    assert run_cli(tmp_path / "in.csv", "-o", output, *tiny_args(tiny_model_dir)) == 0
    frame = read_table(output)
    assert frame.empty
    assert list(frame.columns) == ["image", "caption", "id", *result_columns(False, False, False)]


# -- clear errors ------------------------------------------------------------------------------


def test_clear_errors_for_files_columns_and_state(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dataset = make_dataset(tmp_path / "data")
    out = tmp_path / "s.csv"
    tiny = tiny_args(tiny_model_dir)

    def error_of(*args: str | Path) -> str:
        assert run_cli(*args) == 2
        return capsys.readouterr().err

    assert "input file not found" in error_of(tmp_path / "nope.csv", "-o", out, *tiny)
    message = error_of(dataset.path, "-o", out, "--caption-column", "text", *tiny)
    assert "no caption column (--caption-column) 'text'" in message
    assert "id, image, caption, refs" in message
    assert "no reference column" in error_of(
        dataset.path, "-o", out, "--reference-column", "gt", *tiny
    )
    assert "cannot tell the format" in error_of(dataset.path, "-o", tmp_path / "s.txt", *tiny)
    assert "must not be the input" in error_of(dataset.path, "-o", dataset.path, *tiny)
    assert "--plot: folder does not exist" in error_of(
        dataset.path, "-o", out, "--plot", tmp_path / "no" / "h.png", *tiny
    )
    assert "--url-allowed-host: allow-list entry" in error_of(
        dataset.path, "-o", out, "--url-allowed-host", "cdn.example.com:http", *tiny
    )
    assert "not a CLIP model entry" in error_of(
        dataset.path, "-o", out, "--model-dir", tmp_path, "--quiet"
    )
    assert not out.exists()

    assert run_cli(dataset.path, "-o", out, *tiny) == 0
    assert "--resume" in error_of(dataset.path, "-o", out, *tiny)
    assert "was started with other settings (image_column" in error_of(
        dataset.path, "-o", out, "--resume", "--image-column", "refs", *tiny
    )


def test_scored_columns_in_the_input_are_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    frame = pd.DataFrame({"image": ["a.jpg"], "caption": ["x"], "score": [1.0]})
    frame.to_csv(tmp_path / "in.csv", index=False)
    assert run_cli(tmp_path / "in.csv", "-o", tmp_path / "o.csv", *tiny_args(tiny_model_dir)) == 2


# -- image references --------------------------------------------------------------------------


def test_image_references(tmp_path: Path, image_server: tuple[str, Path]) -> None:
    url, served = image_server
    data = jpeg_bytes(1, 64, 64)
    (served / "one.jpg").write_bytes(data)
    (tmp_path / "one.jpg").write_bytes(data)
    host = url.removeprefix("http://")
    config = LoaderConfig(image_root=tmp_path, max_image_bytes=len(data), url_allowed_hosts=(host,))
    loader = ImageLoader(config)
    b64 = base64.b64encode(data).decode()
    assert loader.load("one.jpg") == data
    assert loader.load(str(tmp_path / "one.jpg")) == data
    assert loader.load(b64) == data
    assert loader.load(f"data:image/jpeg;base64,{b64}") == data
    assert loader.load(data) == data
    assert loader.load({"bytes": data, "path": None}) == data
    assert loader.load({"bytes": None, "path": "one.jpg"}) == data
    assert loader.load(f"{url}/one.jpg") == data

    def code(value: object, config: LoaderConfig | None = None) -> str:
        with pytest.raises(ClipError) as caught:
            ImageLoader(config or loader.config).load(value)
        return caught.value.code

    assert code("two.jpg") == "image_not_found"
    # The service's fetcher and codes: a 404, an allow-listed host with nothing listening.
    assert code(f"{url}/two.jpg") == "url_fetch_failed"
    dead = LoaderConfig(image_root=tmp_path, url_allowed_hosts=("127.0.0.1:9",))
    assert code("http://127.0.0.1:9/x.jpg", dead) == "url_fetch_failed"
    # Its SSRF guard: loopback, private and metadata addresses unless allow-listed.
    open_config = LoaderConfig(image_root=tmp_path)
    assert code(f"{url}/one.jpg", open_config) == "url_not_allowed"
    assert code("http://169.254.169.254/latest/meta-data", open_config) == "url_not_allowed"
    assert code("http://example.com/a.jpg") == "url_not_allowed"  # not in the allow-list
    assert code("file:///etc/passwd") == "url_not_allowed"
    assert code("s3://bucket/key.jpg") == "url_not_allowed"
    assert code("http://example.com:99999/a.jpg") == "invalid_url"
    assert code("http://a..example.com/a.jpg") == "invalid_url"
    off = LoaderConfig(image_root=tmp_path, allow_urls=False, url_allowed_hosts=(host,))
    assert code(f"{url}/one.jpg", off) == "url_not_allowed"
    assert code("") == "invalid_request"
    assert code(None) == "invalid_request"
    assert code(float("nan")) == "invalid_request"
    small = LoaderConfig(
        image_root=tmp_path, max_image_bytes=len(data) - 1, url_allowed_hosts=(host,)
    )
    assert code("one.jpg", small) == "image_too_large"
    assert code(f"{url}/one.jpg", small) == "image_too_large"
    assert code(str(tmp_path)) == "image_unreadable"  # a folder


# -- summary -----------------------------------------------------------------------------------


def test_summary_statistics() -> None:
    scores = [10.0, 20.0, 30.0, 40.0, 50.0]
    frame = pd.DataFrame(
        {
            "model": ["A"] * 7 + ["B"],
            "score": [*scores, None, None, 5.0],
            "error": [None] * 5 + ["image_not_found", "empty_text", None],
        }
    )
    a, b = summarize(frame)
    assert (a.model, a.pairs, a.scored) == ("A", 7, 5)
    assert a.failures == {"empty_text": 1, "image_not_found": 1}
    assert a.mean == 30.0 and a.median == 30.0
    assert a.std == pytest.approx(np.std(scores, ddof=1))
    assert a.percentiles == {p: pytest.approx(np.percentile(scores, p)) for p in (5, 25, 75, 95)}
    assert (b.scored, b.std, b.minimum, b.maximum) == (1, None, 5.0, 5.0)


# -- the remote engine's request logic (the service itself: tests/integration) -------------------

FAST = RetryPolicy(attempts=4, initial_wait_s=0.01, max_wait_s=0.02)


def fake_service(failures: list[int], max_items: int = 100) -> tuple[Any, list[int]]:
    """A stand-in for the generated client's ``evaluate_batch``: answers ``failures`` statuses
    first, refuses batches over ``max_items`` with 413, and records each call's size."""
    calls: list[int] = []

    async def evaluate_batch(items: list[dict[str, str]], model: str) -> dict[str, Any]:
        calls.append(len(items))
        if failures:
            status = failures.pop(0)
            body = {"error": {"code": "service_unavailable", "message": "busy"}}
            raise BentoMLException(json.dumps(body), error_code=HTTPStatus(status))
        if len(items) > max_items:
            body = {"error": {"code": "too_many_items", "message": "too many"}}
            raise BentoMLException(json.dumps(body), error_code=HTTPStatus(413))
        results = [
            {"index": i, "score": 10.0 * len(item["text"]), "cosine": 0.1 * len(item["text"])}
            for i, item in enumerate(items)
        ]
        return {"results": results}

    return evaluate_batch, calls


ITEMS = [{"image": "x", "text": "a" * n} for n in range(1, 6)]


def test_remote_retries_overload_with_backoff() -> None:
    call, calls = fake_service([503, 429, 503])
    results = asyncio.run(BatchRequester(call, FAST).results(ITEMS, "ViT-B-32"))
    assert calls == [5, 5, 5, 5]
    assert [r["score"] for r in results] == [10.0, 20.0, 30.0, 40.0, 50.0]


def test_remote_gives_up_after_the_last_attempt() -> None:
    call, calls = fake_service([503] * 10)
    with pytest.raises(ClipEvalError, match=r"after 4 attempts.*--resume"):
        asyncio.run(BatchRequester(call, FAST).results(ITEMS, "ViT-B-32"))
    assert len(calls) == 4


def test_remote_does_not_retry_a_refused_request() -> None:
    call, calls = fake_service([422])
    with pytest.raises(ClipEvalError, match="refused a batch: HTTP 422"):
        asyncio.run(BatchRequester(call, FAST).results(ITEMS, "ViT-B-32"))
    assert calls == [5]


def test_remote_splits_a_batch_the_service_finds_too_large() -> None:
    call, calls = fake_service([], max_items=2)
    results = asyncio.run(BatchRequester(call, FAST).results(ITEMS, "ViT-B-32"))
    assert [r["cosine"] for r in results] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert calls == [5, 2, 3, 1, 2]  # halves until each fits, order kept


def test_remote_waits_as_long_as_retry_after_says() -> None:
    """A 503 with ``Retry-After: 1`` delays the retry by a second although the backoff would
    wait 0.02 s: the answer goes through an httpx client carrying the engine's response hook,
    as the generated client's requests do."""
    answers = [httpx.Response(503, headers={"retry-after": "1"}), httpx.Response(200)]
    transport = httpx.MockTransport(lambda request: answers.pop(0))
    sent: list[float] = []

    async def evaluate_batch(items: list[dict[str, str]], model: str) -> dict[str, Any]:
        async with httpx.AsyncClient(
            transport=transport, event_hooks={"response": [record_retry_after]}
        ) as http:
            sent.append(time.monotonic())
            response = await http.post("http://service/evaluator/v1/evaluation/batch")
        if response.status_code != 200:
            raise BentoMLException("busy", error_code=HTTPStatus(response.status_code))
        return {"results": [{"index": i, "score": 1.0, "cosine": 0.01} for i in range(len(items))]}

    results = asyncio.run(BatchRequester(evaluate_batch, FAST).results(ITEMS, "ViT-B-32"))
    assert len(results) == len(ITEMS)
    assert len(sent) == 2
    assert 1.0 <= sent[1] - sent[0] < 5.0


def test_retry_after_header_forms() -> None:
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("Wed, 01 Jan 2025 12:00:07 GMT", now) == 7.0
    assert parse_retry_after("Wed, 01 Jan 2025 11:00:00 GMT", now) == 0.0  # already past
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_generated_client_sends_the_key_and_records_retry_after() -> None:
    """What the engine assumes of BentoML's AsyncHTTPClient: ``.client`` is the httpx client its
    calls go through, and ``token`` becomes the bearer header (no request is sent here)."""
    client = generated_client("http://127.0.0.1:9", 5.0, "secret-key")
    assert isinstance(client.client, httpx.AsyncClient)
    assert record_retry_after in client.client.event_hooks["response"]
    assert client.client.headers["authorization"] == "Bearer secret-key"
    keyless = generated_client("http://127.0.0.1:9", 5.0, None)
    assert "authorization" not in keyless.client.headers


def test_remote_says_how_to_pass_a_refused_key() -> None:
    call, calls = fake_service([401])
    with pytest.raises(ClipEvalError, match=r"refused the API key.*--api-key or.*CLIP_API_KEY"):
        asyncio.run(BatchRequester(call, FAST).results(ITEMS, "ViT-B-32"))
    assert calls == [5]


def test_api_key_defaults_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIP_API_KEY", "from-env")
    assert cli.build_parser().parse_args(["x.csv"]).api_key == "from-env"
    assert cli.build_parser().parse_args(["x.csv", "--api-key", "k"]).api_key == "k"
    monkeypatch.delenv("CLIP_API_KEY")
    assert cli.build_parser().parse_args(["x.csv"]).api_key is None


def test_console_script_entry_point(capsys: pytest.CaptureFixture[str]) -> None:
    """The console script pyproject declares resolves to the CLI."""
    import pkgutil
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    entry = pkgutil.resolve_name(pyproject["project"]["scripts"]["clip-eval"])
    with pytest.raises(SystemExit) as exited:
        entry(["--help"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith("usage: clip-eval [-h]")


def test_the_plot_shows_the_cosine_beside_the_score_and_flags_untrained_weights() -> None:
    """Random-init scores clamp to 0 (negative cosines): the cosine panel shows the spread the
    score panel cannot, and the figure says the weights are untrained."""
    from clip_eval.summary import histogram_figure

    cosines = [-0.08, -0.05, -0.02, 0.01]
    results = pd.DataFrame(
        {"model": "ViT-B-32", "cosine": cosines, "score": [max(c, 0) * 100 for c in cosines]}
    )
    figure = histogram_figure(results, untrained=["ViT-B-32"])
    score_axes, cosine_axes = figure.axes
    assert (score_axes.get_title(), cosine_axes.get_title()) == ("score", "cosine")
    low, high = cosine_axes.get_xlim()
    assert low <= min(cosines) and high >= max(cosines)
    assert any("UNTRAINED" in text.get_text() for text in figure.texts)
    trained = histogram_figure(results)
    assert not any("UNTRAINED" in text.get_text() for text in trained.texts)


def test_the_remote_engine_reads_untrained_models_from_health() -> None:
    """The remote engine names the untrained models the service reports (and none when the
    service cannot say)."""
    from clip_eval.engines.remote import RemoteConfig, RemoteEngine
    from tests.local_http import local_server

    health = {
        "status": "ok",
        "models": [
            {"name": "ViT-B-32", "untrained": True},
            {"name": "ViT-L-14", "untrained": False},
            {"name": "not-asked", "untrained": True},
        ],
    }
    body = json.dumps(health).encode()
    with local_server() as running:
        running.routes["/evaluator/health"] = (200, {"Content-Type": "application/json"}, body)
        config = RemoteConfig(
            url=running.url(""),
            models=("ViT-B-32", "ViT-L-14"),
            loader=LoaderConfig(image_root=Path(".")),
            api_key="k",
        )
        assert RemoteEngine(config).untrained_models() == ["ViT-B-32"]
        running.routes.clear()  # 404: the service cannot say
        assert RemoteEngine(config).untrained_models() == []


def test_local_engine_on_the_openvino_runtime(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("openvino", reason="openvino is not installed")
    from clip_runtime import openvino_runtime

    monkeypatch.setenv("CLIP_RUNTIME_CACHE_DIR", str(tmp_path / "cache"))
    dataset = make_dataset(tmp_path / "data")
    output = tmp_path / "scores.csv"
    conversions = openvino_runtime.stats.conversions
    args = ["--runtime", "openvino", "--precision", "fp32"]  # auto may be bf16 (its own bound)
    code = run_cli(dataset.path, "-o", output, *args, *tiny_args(tiny_model_dir))
    assert code == 0
    assert openvino_runtime.stats.conversions == conversions + 1  # it ran on OpenVINO
    check_output(output, dataset, tiny_model_dir, atol=1e-4)  # docs/runtime.md's fp32 bound


def test_a_precision_the_cpu_cannot_run_is_refused(
    tmp_path: Path,
    tiny_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr("clip_runtime.runtimes.cpu_has_native_bf16", lambda: False)
    dataset = make_dataset(tmp_path / "data")
    args = ["--runtime", "torch", "--precision", "bf16", "--device", "cpu"]
    code = run_cli(dataset.path, "-o", tmp_path / "out.csv", *args, *tiny_args(tiny_model_dir))
    assert code == 2
    assert "no native bf16" in capsys.readouterr().err
