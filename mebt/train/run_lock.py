"""One training per run directory: rank 0 holds an advisory lock on ``RUN_DIR/.lock`` for the whole run.

A second `mebt train` into a run directory that a live training uses would resume from its checkpoints
and write the same files. The lock is ``flock`` on an open file, so the kernel releases it when the
holder dies (kill -9, a node's crash on a shared filesystem that supports it): a stale lock is simply
taken over, nothing to clean up. The file records the holder's host, pid and start time so the refusal
can name them. Every rank learns the verdict of rank 0 (one all-gather), so a refused multi-process
start stops on every rank with the same line instead of leaving the others waiting in a collective.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from mebt.errors import UserError, WriteError
from mebt.train.distributed import all_gather_object

LOCK_FILE = ".lock"


class RunDirLock:
    def __init__(self, run_dir: str | Path, active: bool):
        """Take the lock on rank 0 (``active``); every rank raises the same UserError when it is held."""
        self.file = None
        refusal = self._take(Path(run_dir)) if active else None
        refusals = [r for r in all_gather_object(refusal) if r]
        if refusals:
            self.release()
            raise UserError(refusals[0])

    def _take(self, run_dir: Path) -> str | None:
        path = run_dir / LOCK_FILE
        try:   # the first write into the run dir: a read-only or full file system is found here
            run_dir.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a+")
        except OSError as e:
            return str(WriteError.of(path, e)).replace("any previous file there is unchanged; ", "")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            try:
                holder = json.loads(self.file.read())
                who = f"host {holder['host']}, pid {holder['pid']}, started {holder['started']}"
            except (ValueError, KeyError):
                who = "a process that has not written its name yet"
            self.file.close()
            self.file = None
            return (f"run dir '{run_dir}' is in use by another training ({who}); stop it first, or train into "
                    "another train.run_dir")
        self.file.seek(0)
        self.file.truncate()
        self.file.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                    "started": time.strftime("%Y-%m-%d %H:%M:%S")}))
        self.file.flush()
        return None

    def release(self) -> None:
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None
