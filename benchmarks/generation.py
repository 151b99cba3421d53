"""Generation time: MeBT sampling against autoregressive transformers with a KV cache.

Methods, per sampling preset:
- ``mebt official``: the published procedure as the official code runs it (every pass computes the logits
  of every target);
- ``mebt exact``: the same codes with less work (``mebt.core.sampling``: rows-only last block and head,
  kept context keys/values, chunked top-k-first sampling);
- ``mebt 1-pass bootstrap`` (presets with a bootstrap): NOT the published procedure, the bootstrap tokens
  committed in one pass (``bootstrap_passes=1``), with the exact fixes;
- ``AR``: a causal transformer of the same width over the whole grid, one cached step per code;
- ``AR 16f window`` (128-frame presets): TATS's long-video setting, a 16-frame (4 latent frames) model
  that slides one latent frame at a time.
The cases of one preset and batch are timed interleaved (A, B, C, A, B, C, ...) ``--repeats`` times and
reported as min / median; FLOPs per sample are counted once per method (torch's FlopCounterMode,
attention included), so GFLOP/s shows which method is compute-bound and which latency-bound.
16-frame presets use a 4x16x16 grid (1024 codes), 128-frame presets 32x16x16 (8192 codes).
"""
from __future__ import annotations

import argparse
import dataclasses

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from benchmarks.common import (
    Setup,
    add_common_args,
    autocast,
    interleaved,
    min_median,
    print_table,
    print_target,
    ratio,
    run_benchmark,
)
from mebt.core.baselines import AutoregressiveTransformer
from mebt.core.model import MeBT, MeBTConfig
from mebt.core.sampling import PRESETS, num_forward_passes, preset, sample
from mebt.fsutil import seed_everything

GRIDS = {"16f": (4, 16, 16), "128f": (32, 16, 16)}
# --quick keeps the two lengths distinct but small; the presets' chunk counts (up to 32) and bootstrap (64)
# still divide / fit these grids.
QUICK_GRIDS = {"16f": (2, 4, 4), "128f": (8, 4, 4)}
WINDOW_FRAMES = 4   # 16 video frames at the tokenizer's 4x temporal downsampling
TARGET_RATIO_128F = 10.0
METHODS = ("mebt official", "mebt exact", "mebt 1-pass bootstrap", "AR", "AR 16f window")
# FlopCounterMode knows the CUDA attention kernels; CPU attention is this op.
_CPU_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
             lambda query, key, value, *args, out_shape=None, **kwargs: sdpa_flop_count(query, key, value)}


def grid_for(preset_name: str, quick: bool) -> tuple[int, int, int]:
    length = preset_name.rsplit("_", 1)[-1]
    return (QUICK_GRIDS if quick else GRIDS)[length]


def build(cls, grid, env: Setup, seed: int):
    seed_everything(seed)
    # Inference only; FlopCounterMode's module tracker also fails on parameters that want gradients.
    return cls(MeBTConfig(latent_shape=grid, numerics="preln", **env.dims)).to(env.device).eval().requires_grad_(False)


def count_flops(fn) -> int:
    with FlopCounterMode(display=False, custom_mapping=_CPU_SDPA) as counter:
        fn()
    return counter.get_total_flops()


def cases(grid, name: str, batch: int, env: Setup, args, models: dict) -> dict[str, tuple[int, callable]]:
    """Method -> (forward passes, a call that generates ``batch`` samples) for one preset."""
    cfg, n = preset(name), grid[0] * grid[1] * grid[2]
    generator = torch.Generator(env.device).manual_seed(args.seed)
    out = {"mebt official": (num_forward_passes(cfg, n),
                             lambda: sample(models["mebt"], cfg, batch, generator=generator, fast=False)),
           "mebt exact": (num_forward_passes(cfg, n), lambda: sample(models["mebt"], cfg, batch, generator=generator))}
    if cfg.bootstrap:
        one = dataclasses.replace(cfg, bootstrap_passes=1)
        out["mebt 1-pass bootstrap"] = (num_forward_passes(one, n),
                                        lambda: sample(models["mebt"], one, batch, generator=generator))
    out["AR"] = (n, lambda: models["ar"].generate(batch, generator=generator))
    if "window" in models:
        out["AR 16f window"] = (n, lambda: models["window"].generate_sliding(batch, grid[0], generator=generator))
    return {m: case for m, case in out.items() if m in args.methods}


def time_grid(grid, names: list[str], env: Setup, args) -> list[dict]:
    """Rows (preset x batch size) for the presets ``names`` on one grid."""
    models = {"mebt": build(MeBT, grid, env, args.seed), "ar": build(AutoregressiveTransformer, grid, env, args.seed)}
    if grid[0] > WINDOW_FRAMES and "AR 16f window" in args.methods:
        models["window"] = build(AutoregressiveTransformer, (WINDOW_FRAMES, *grid[1:]), env, args.seed)
    rows = []
    for name in names:
        flops = {}
        with torch.no_grad(), autocast(env.device, env.bf16):
            for method, (_, fn) in cases(grid, name, 1, env, args, models).items():
                # Also the warm-up: one-time costs are not timed. Without counting, a batch-1 run warms up.
                flops[method] = count_flops(fn) if args.flops else (fn(), None)[1]
        for batch in args.batch_sizes:
            todo = cases(grid, name, batch, env, args, models)
            with torch.no_grad(), autocast(env.device, env.bf16):
                timing = interleaved({m: fn for m, (_, fn) in todo.items()}, args.repeats, env.device)
            methods = {m: {"passes": todo[m][0], "seconds": timing[m], "samples_per_s": batch / timing[m]["min"],
                           "flops_per_sample": flops[m]} for m in todo}
            best = {m: t["seconds"]["min"] for m, t in methods.items()}

            def over(a: str, b: str):   # None when --methods left one out
                return ratio(best[a], best[b]) if a in best and b in best else None

            rows.append({"preset": name, "grid": list(grid), "tokens": grid[0] * grid[1] * grid[2], "batch": batch,
                         "methods": methods, "exact_speedup": over("mebt official", "mebt exact"),
                         "ar_over_official": over("AR", "mebt official"), "ar_over_exact": over("AR", "mebt exact")})
            print(f"  {name} batch {batch}: " + ", ".join(f"{m} {min_median(t['seconds'])} s"
                                                           for m, t in methods.items()), flush=True)
    return rows


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["sky_16f", "sky_128f"], choices=sorted(PRESETS),
                   help="MeBT sampling presets (default: sky_16f sky_128f)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                   help="batch sizes to time (default: 1 and the evaluator's 16 on a GPU; 1 on CPU, where "
                        "sampling is compute-bound and a batch only multiplies the time)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, metavar="METHOD",
                   help=f"methods to time (default: all of {', '.join(repr(m) for m in METHODS)})")
    p.add_argument("--no-flops", dest="flops", action="store_false", help="skip counting FLOPs (one more sample each)")
    add_common_args(p)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    return run_benchmark(parse_args(argv), run)


def run(args: argparse.Namespace, env: Setup) -> dict:
    args.batch_sizes = args.batch_sizes or ([1, 16] if env.device.type == "cuda" else [1])
    print(f"{env.header()}; batch sizes {args.batch_sizes}; {args.repeats} interleaved repeats (min / median)")
    by_grid: dict[tuple, list[str]] = {}
    for name in args.presets:
        by_grid.setdefault(grid_for(name, args.quick), []).append(name)
    rows = [row for grid, names in by_grid.items() for row in time_grid(grid, names, env, args)]

    headers = ["preset", "N", "batch", "method", "passes", "s/sample min / med", "samples/s", "GFLOP/sample",
               "GFLOP/s"]
    print_table(headers, [[r["preset"], str(r["tokens"]), str(r["batch"]), m, str(t["passes"]),
                           min_median(t["seconds"], 1 / r["batch"]), f"{t['samples_per_s']:.3g}",
                           *((f"{t['flops_per_sample'] / 1e9:.1f}",
                              f"{t['flops_per_sample'] * r['batch'] / t['seconds']['min'] / 1e9:.1f}")
                             if t["flops_per_sample"] else ("-", "-"))]
                          for r in rows for m, t in r["methods"].items()])
    shown = lambda value: "-" if value is None else f"{value:.2f}"   # noqa: E731
    print_table(["preset", "batch", "official/exact", "AR/official", "AR/exact"],
                [[r["preset"], str(r["batch"]), shown(r["exact_speedup"]), shown(r["ar_over_official"]),
                  shown(r["ar_over_exact"])] for r in rows])
    long_rows = [r for r in rows if r["preset"].endswith("_128f") and r["ar_over_official"] is not None]
    if long_rows:
        print("targets (the paper's claim for 128-frame videos, against the official procedure):")
        for r in long_rows:
            print_target(f"{r['preset']} batch {r['batch']} AR/mebt time", r["ar_over_official"], ">=",
                         TARGET_RATIO_128F)
    return {"benchmark": "generation", **env.describe(), "repeats": args.repeats, "rows": rows}


if __name__ == "__main__":
    main()
