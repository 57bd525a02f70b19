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
from collections.abc import Sequence
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[2]
GRACEFUL_SHUTDOWN_S = 20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def save_random_init_models(
    bentoml_home: Path, models: list[str], seed: int = 0, options: Sequence[str] = ()
) -> None:
    """The project's own script, exactly as a user runs it, into ``bentoml_home``; ``options``
    are more of its arguments (``--config``, ``--tokenizer``)."""
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "save_models.py"),
            "--models",
            *models,
            "--random-init",
            "--seed",
            str(seed),
            *options,
        ],
        env={**os.environ, "BENTOML_HOME": str(bentoml_home)},
        check=True,
        capture_output=True,
        timeout=600,
    )


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
    ) -> None:
        """Serve ``target`` (the source tree's service, or a Bento tag from ``cwd``) with the
        ``bentoml`` of ``python``'s environment."""
        self.port = free_port()
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
        self.target, self.python, self.cwd = target, python, cwd

    def start(self, timeout_s: float = 300) -> ServerProcess:
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
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout_s}s:\n{self.log()}")

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
