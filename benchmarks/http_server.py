"""A real HTTP server on 127.0.0.1 serving a folder (the standard library's), with a log of the paths asked for:
the remote end of `mebt bench loader` and of the tests of shard URLs."""
from __future__ import annotations

import functools
import socket
import subprocess
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from mebt.train.distributed import free_port


class FolderServer:
    """``with FolderServer(folder) as server``: ``server.url`` serves ``folder``; ``server.requests`` lists the
    paths of every GET; ``stop()`` closes the socket (later requests are refused)."""

    def __init__(self, folder: str | Path):
        requests = self.requests = []

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self):
                requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):   # quiet: the test output is the loader's
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class ServerProcess:
    """``python -m http.server`` on 127.0.0.1 in its own process (no GIL shared with the reader being timed)."""

    def __init__(self, folder: str | Path):
        port = free_port()
        self._proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                       "--directory", str(folder)], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:   # ready once it accepts a connection
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"http.server on port {port} did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        self._proc.terminate()
        self._proc.wait(timeout=30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
