"""Helpers shared by the benchmark scripts: model widths, device and dtype handling, timing, output."""
from __future__ import annotations

import argparse
import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from mebt.fsutil import write_json
from mebt.train.distributed import pick_device

# Widths the benchmarks compare MeBT and its baselines at. The CPU default keeps a run to minutes on two
# cores; the paper width (d=1024, 16 heads, 24 layers) is meant for a GPU with bf16 autocast.
WIDTHS = {
    "quick": dict(n_embd=32, n_head=2, n_layer=2, n_latent=16, vocab_size=64),
    "cpu": dict(n_embd=256, n_head=4, n_layer=8, n_latent=256, vocab_size=16384),
    "paper": dict(n_embd=1024, n_head=16, n_layer=24, n_latent=256, vocab_size=16384),
}


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--paper-width", action="store_true",
                        help="n_embd 1024, n_head 16, n_layer 24 with bf16 autocast (for a GPU)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes that run in seconds (for tests)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice; 1 with --quick)")


@contextlib.contextmanager
def cpu_threads(args: argparse.Namespace):
    """Run with ``--threads`` CPU threads, restoring the process-wide setting afterwards.

    --quick uses one thread: its tiny ops gain nothing from parallelism, and on a busy machine every
    parallel region can stall waiting for a descheduled worker thread (100x slowdowns were seen).
    """
    threads = args.threads or (1 if args.quick else None)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class Setup:
    """Where and at which width a benchmark runs."""
    device: torch.device
    width: str          # a key of WIDTHS
    dims: dict          # MeBTConfig fields of that width
    bf16: bool          # autocast to bf16 (paper width)

    def describe(self) -> dict:
        return {"device": describe_device(self.device), "width": self.width, "config": self.dims, "bf16": self.bf16}

    def header(self) -> str:
        return (f"device: {describe_device(self.device)}; width '{self.width}': {self.dims}; "
                f"dtype {'bf16 autocast' if self.bf16 else 'fp32'}")


def setup(args: argparse.Namespace) -> Setup:
    width = "quick" if args.quick else "paper" if args.paper_width else "cpu"
    device = pick_device(args.device or "auto")
    return Setup(device, width, WIDTHS[width], bf16=width == "paper")


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    # CPU timings depend on what else runs: the load average says whether the cores were shared.
    return f"cpu ({torch.get_num_threads()} threads, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f})"


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast for the paper-width runs, a no-op context otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call, including the queued GPU work."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else float("inf")


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))


def print_target(label: str, measured: float, op: str, target: float) -> None:
    """A published expectation next to what was measured; reported, never asserted."""
    met = measured >= target if op == ">=" else measured <= target
    print(f"  {label}: measured {measured:.2f}, target {op} {target:g} ({'met' if met else 'NOT met'})")


def run_benchmark(args: argparse.Namespace, run: Callable[[argparse.Namespace, Setup], dict]) -> dict:
    """Run ``run(args, setup)`` with the requested CPU threads; write its result to ``--json`` if given."""
    with cpu_threads(args):
        result = run(args, setup(args))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return result
