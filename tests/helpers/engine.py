"""Running `mebt train` as processes and reading what they leave: shared by the engine, SLURM and logging tests."""
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from mebt.train.distributed import free_port
from tests.helpers import CODES_GRID as GRID


def overrides(codes_dir, run_dir, **extra) -> list[str]:
    base = {"data.data_dir": codes_dir, "data.batch_size": 4, "train.run_dir": run_dir, "train.steps": 60,
            "train.ckpt_every": 5, "train.log_every": 5, "train.trace": "true", "train.deterministic": "true",
            "train.num_samples": 2, "mlflow.enabled": "false", "model.latent_shape": f"[{','.join(map(str, GRID))}]",
            "model.vocab_size": 8, "model.n_layer": 2, "model.n_embd": 32, "model.n_head": 2, "model.n_latent": 8,
            "model.numerics": "preln", "sampling.steps": 4, "optim.lr": 0.003,
            # Several loss chunks whose count follows the mask ratio: ranks must agree on it under ZeRO-3.
            "objective.loss_chunk_rows": 16}
    return [f"{k}={v}" for k, v in {**base, **extra}.items()]


def command(nproc: int, args: list[str]) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "mebt.cli", "train", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
            "-m", "mebt.cli", "train", *args]


def run(nproc: int, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command(nproc, args), capture_output=True, text=True, timeout=timeout)


def trace(run_dir: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "trace" / f"rank{rank}.jsonl").read_text().splitlines()]


def steps_traced(run_dir: Path) -> int:
    path = run_dir / "trace" / "rank0.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def output_of(proc: subprocess.Popen) -> str:
    """The tail of a process's combined output; it is stopped first, so reading cannot block."""
    proc.kill()
    return proc.communicate()[0][-3000:]


def wait_for(ready, explain, procs=(), timeout: float = 240) -> None:
    """Poll ``ready()``; fail with ``explain()`` when one of ``procs`` exits first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, explain()
        time.sleep(0.05)


def latest(run_dir: Path) -> str | None:
    pointer = run_dir / "checkpoints" / "latest"
    return pointer.read_text() if pointer.exists() else None


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process below it (from /proc): torchrun starts each worker in a session of its own,
    so signalling torchrun's process group does not reach them."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def start_and_interrupt(nproc: int, args: list[str], run_dir: Path, how: int) -> subprocess.Popen:
    """Start training, wait for its first checkpoint, then send ``how`` to every process of the run (the
    launcher and each worker, by pid) and wait until none runs."""
    proc = subprocess.Popen(command(nproc, args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    wait_for(lambda: latest(run_dir) is not None, lambda: output_of(proc), [proc])
    tree = process_tree(proc.pid)
    assert len(tree) >= 1 + (nproc if nproc > 1 else 0), tree   # torchrun and its workers
    for pid in tree:
        try:
            os.kill(pid, how)
        except ProcessLookupError:
            pass
    proc.wait(timeout=120)
    wait_for(lambda: not any(map(running, tree)), lambda: f"still running: {[p for p in tree if running(p)]}",
             timeout=120)
    return proc


def communicate_while_progressing(proc: subprocess.Popen, stall_s: float = 300) -> tuple[str, str]:
    """``proc.communicate()`` for a process started with stdout and stderr pipes, with no limit on the total
    time: it fails only when the process prints nothing (no progress bar tick, no log line) for ``stall_s``
    seconds, so a loaded machine is slow but passes and a hang still fails."""
    chunks: dict[int, list[bytes]] = {1: [], 2: []}
    last = [time.monotonic()]

    def pump(stream, key):
        while data := os.read(stream.fileno(), 65536):
            chunks[key].append(data)
            last[0] = time.monotonic()

    streams = ((1, proc.stdout), (2, proc.stderr))
    threads = [threading.Thread(target=pump, args=(s, k), daemon=True) for k, s in streams]
    for t in threads:
        t.start()
    while proc.poll() is None:
        if time.monotonic() - last[0] > stall_s:
            proc.kill()
            tail = b"".join(chunks[2])[-3000:].decode(errors="replace")
            raise AssertionError(f"no output for {stall_s:.0f} s: {tail}")
        time.sleep(0.5)
    for t in threads:
        t.join(30)
    return tuple(b"".join(chunks[k]).decode(errors="replace") for k in (1, 2))
