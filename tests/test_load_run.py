"""`python -m load_tests.run` against a stand-in service on 127.0.0.1: its summary counts every
request the service answered (the stop timeout included), and the API key reaches the service."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from load_tests import run

KEY = "load-test-key"


class KeyedService(ThreadingHTTPServer):
    """Answers every POST after 0.3 s: 200 with the right bearer token, 401 without it."""

    daemon_threads = True

    def __init__(self) -> None:
        self.answered = 0
        self.unauthorized = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", 0)))
                time.sleep(0.3)  # slow enough that users are mid-request at the stop
                authorized = self.headers.get("authorization") == f"Bearer {KEY}"
                body = b'{"score": 1.0}' if authorized else b'{"error": {}}'
                self.send_response(200 if authorized else 401)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                with server.lock:
                    server.answered += 1
                    server.unauthorized += not authorized

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture
def service() -> Iterator[KeyedService]:
    server = KeyedService()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def run_load(service: KeyedService, reports: Path, *extra: str) -> tuple[int, str]:
    url = f"http://127.0.0.1:{service.server_address[1]}"
    args = ["--url", url, "--users", "3", "--spawn-rate", "3", "--run-time", "3s"]
    args += ["--reports", str(reports), "--user-classes", "SingleUser", *extra]
    return run.main(args), url


def test_summary_counts_every_answered_request_and_sends_the_key(
    service: KeyedService, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _ = run_load(service, tmp_path, "--api-key", KEY)
    out = capsys.readouterr().out
    counted = re.search(r"^(\d+) requests, (\d+) failures", out, re.MULTILINE)
    assert counted, out
    assert service.unauthorized == 0
    assert int(counted[1]) == service.answered > 0, out
    assert (code, int(counted[2])) == (0, 0), out
    assert "PASS" in out


def test_without_the_key_every_request_fails(
    service: KeyedService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CLIP_API_KEY", raising=False)
    code, _ = run_load(service, tmp_path)
    assert code == 1
    assert service.unauthorized == service.answered > 0


def test_the_started_service_takes_a_port(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`make load-test PORT=N` (and `--port N`) serves the service it starts on N; without it, a
    free port."""
    import subprocess

    from clip_testkit.server import ServerProcess

    make = ["make", "-n", "load-test", "VENV=/no-venv"]
    given = subprocess.run([*make, "PORT=3100"], capture_output=True, text=True, check=True)
    assert "--port 3100" in given.stdout
    monkeypatch.delenv("PORT", raising=False)
    default = subprocess.run(make, capture_output=True, text=True, check=True)
    assert "--port" not in default.stdout
    assert run.parse_args(["--port", "3100"]).port == 3100
    server = ServerProcess(tmp_path / "home", tmp_path / "serve.log", port=3100)
    assert server.url == "http://127.0.0.1:3100"
