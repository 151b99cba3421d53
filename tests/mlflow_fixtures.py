"""A real MLflow tracking server for tests: ``start_mlflow_server(workdir)`` and the session fixture ``mlflow_server``.

The server runs in its own process group (it forks workers; SIGTERM takes seconds), on a free
loopback port, with a sqlite backend and served artifacts in ``workdir``. Startup is slow (~20 s cold),
so the suite shares one session-scoped server; ``kill()`` exists for tests that simulate a crash.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mebt.train.distributed import free_port


class MlflowServer:
    def __init__(self, workdir: Path, port: int, proc: subprocess.Popen, log_path: Path):
        self.workdir, self.port, self.proc, self.log_path = workdir, port, proc, log_path
        self.uri = f"http://127.0.0.1:{port}"
        self.db_uri = f"sqlite:///{workdir / 'mlflow.db'}"
        self._done = False  # signals go to the group only once: afterwards its id may belong to someone else

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the whole server (a crash, as far as clients can tell)."""
        if not self._done:
            self._done = True
            self._signal_group(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        """SIGTERM the server's process group, SIGKILL whatever is left after 10 s."""
        if self._done:
            return
        self._done = True
        self._signal_group(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self._signal_group(signal.SIGKILL)  # the parent if it hung, and workers that outlived it
        self.proc.wait()

    def __enter__(self) -> "MlflowServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_mlflow_server(workdir: Path, timeout: float = 120.0) -> MlflowServer:
    """Start ``mlflow server`` on sqlite:///<workdir>/mlflow.db with artifacts in <workdir>/artifacts; wait for /health."""
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    script = Path(sys.executable).with_name("mlflow")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "mlflow"]
    cmd += ["server", "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
            "--artifacts-destination", str(workdir / "artifacts"), "--host", "127.0.0.1",
            "--port", str(port), "--workers", "1"]
    log_path = workdir / "mlflow-server.log"
    with open(log_path, "wb") as log:
        # The job runner (a dozen huey consumers, ~2.5 GB together) serves GenAI features tracking never uses.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=workdir, start_new_session=True,
                                env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    server = MlflowServer(workdir, port, proc, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(f"{server.uri}/health", timeout=2) as r:
                if r.status == 200:
                    return server
        except OSError:
            pass
        time.sleep(0.25)
    server.stop()
    raise RuntimeError(f"mlflow server on port {port} did not answer /health within {timeout:.0f} s "
                       f"(exit code {proc.returncode}); log tail:\n{server.log_tail()}")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One MLflow server for the whole test session (started on first use, ~20 s)."""
    with start_mlflow_server(tmp_path_factory.mktemp("mlflow_server")) as server:
        yield server
