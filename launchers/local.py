"""`mebt launch local train --nproc N ...`: N training processes on this machine, without SLURM or torchrun.

The launcher takes the resolved ``RunConfig``: it is written once to ``RUN_DIR/launch_config.yaml`` and
each process runs ``python -m mebt.train --config`` that file with the rendezvous variables torchrun would set (rank,
world size, local rank, loopback master, a free port) and a fair share of the cores as its thread count.
Unlike torchrun, the launcher's exit code is the training's: 0, or 75 when every process checkpointed
and stopped for a signal (``REQUEUE_EXIT_CODE``: run the same command again to resume), or the first
failure's code. SIGINT/SIGTERM/SIGUSR1 are passed on to every process, so a stop request reaches the
training loop, which checkpoints at the next step boundary. If one process fails the others are stopped
instead of hanging in a collective.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from mebt.config import as_base, to_dict
from mebt.errors import UserError
from mebt.fsutil import write_text
from mebt.train.config import RunConfig
from mebt.train.distributed import free_port
from mebt.train.loop import REQUEUE_EXIT_CODE

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def worker_env(rank: int, nproc: int, port: int, environ=os.environ) -> dict:
    threads = max(1, (os.cpu_count() or 1) // nproc)
    return {**environ, "RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": environ.get("OMP_NUM_THREADS", str(threads))}


@dataclass
class LocalTrainJob(RunConfig):
    """`mebt launch local train`: a training config plus the number of processes."""
    nproc: int = 2                         # training processes on this machine (ranks 0..N-1)

    def run_config(self) -> RunConfig:
        return as_base(self, RunConfig)


def launch_local(cfg: RunConfig, nproc: int, grace_s: float = 30.0) -> int:
    """Train ``cfg`` as ``nproc`` processes; returns the exit code to use."""
    if nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {nproc}")
    path = Path(cfg.train.run_dir) / "launch_config.yaml"
    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "mebt.train", "--config", str(path)],
                              env=worker_env(rank, nproc, port)) for rank in range(nproc)]
    forwarded = set()

    def forward(signum, _):
        forwarded.add(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        failed_at = None
        while any(p.poll() is None for p in procs):
            bad = [p for p in procs if p.returncode not in (None, 0, REQUEUE_EXIT_CODE)]
            if bad and failed_at is None:
                failed_at = time.monotonic()
                if signal.SIGINT not in forwarded:   # after Ctrl-C, rank 0 has said what happened
                    print(f"mebt launch: process {procs.index(bad[0])} exited with {bad[0].returncode}; stopping "
                          "the others", file=sys.stderr)
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
            if failed_at is not None and time.monotonic() - failed_at > grace_s:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.1)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    codes = [p.returncode for p in procs]
    if all(c == 0 for c in codes):
        return 0
    if all(c == REQUEUE_EXIT_CODE for c in codes):
        return REQUEUE_EXIT_CODE
    # The first real failure, not the SIGTERM this launcher sent the others; a signal death as the shell shows it.
    failures = [c for c in codes if c not in (0, REQUEUE_EXIT_CODE)]
    first = next((c for c in failures if c != -signal.SIGTERM), failures[0] if failures else 1)
    return first if first > 0 else 128 - first
