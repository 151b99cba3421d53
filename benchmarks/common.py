"""Helpers shared by the benchmark scripts: model widths, device and dtype handling, timing, output."""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
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
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="CPU thread counts for torch, one table each (default on CPU: 1 and all cores; "
                             "1 with --quick)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs of each case, interleaved with the other cases (min and median)")


def thread_counts(args: argparse.Namespace, device: torch.device) -> list[int]:
    """The thread counts to run the tables at. One thread shows the arithmetic without thread stalls (on a
    busy machine every parallel region can wait for a descheduled worker: 100x slowdowns were seen), all
    cores what a user gets; --quick's tiny ops gain nothing from threads."""
    if args.threads:
        return list(dict.fromkeys(args.threads))
    if args.quick:
        return [1]
    return [torch.get_num_threads()] if device.type == "cuda" else list(dict.fromkeys([1, os.cpu_count() or 1]))


@contextlib.contextmanager
def cpu_threads(threads: int):
    """Run with ``threads`` CPU threads, restoring the process-wide setting afterwards."""
    before = torch.get_num_threads()
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


def interleaved(cases: dict, repeats: int, device: torch.device, budget_s: float = float("inf")) -> dict[str, dict]:
    """Time every case ``repeats`` times, in turn (A, B, C, A, B, C, ...), so that a change of load on a
    shared machine hits every case alike: per case, the seconds of each run, their min and median. A case
    whose runs took ``budget_s`` in all gets no more (every case runs at least once)."""
    runs: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            if not runs[name] or sum(runs[name]) < budget_s:
                runs[name].append(seconds(fn, device))
    return {name: {"min": min(t), "median": statistics.median(t), "runs": t} for name, t in runs.items()}


def min_median(timing: dict, scale: float = 1.0, digits: int = 2) -> str:
    """"min / median" of an ``interleaved`` entry, times ``scale`` (e.g. 1000 for ms, 1/batch per sample)."""
    return f"{timing['min'] * scale:.{digits}f} / {timing['median'] * scale:.{digits}f}"


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
    """Run ``run(args, setup)`` once per thread count (``thread_counts``), recording the load average before
    and after each; write the results to ``--json`` if given: {"benchmark", "runs": [run's dict + threads,
    load_before, load_after]}."""
    env = setup(args)
    runs = []
    for threads in thread_counts(args, env.device):
        with cpu_threads(threads):
            load = os.getloadavg()[0]
            print(f"--- {threads} thread(s), load average {load:.2f}", flush=True)
            result = run(args, env)
            runs.append({**result, "threads": threads, "load_before": load, "load_after": os.getloadavg()[0]})
    result = {"benchmark": runs[0]["benchmark"], "runs": runs}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return result
