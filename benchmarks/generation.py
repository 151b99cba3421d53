"""Generation time: MeBT's non-autoregressive sampling against an autoregressive transformer with a KV cache.

MeBT runs the paper's sampling presets (a few dozen to a few hundred passes over the whole grid); the
autoregressive baseline (same width, depth and heads) makes one cached forward step per code, N in all.
16-frame presets use a 4x16x16 grid (1024 codes), 128-frame presets 32x16x16 (8192 codes).
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.common import Setup, add_common_args, autocast, print_table, print_target, ratio, run_benchmark, seconds
from mebt.core.baselines import AutoregressiveTransformer
from mebt.core.model import MeBT, MeBTConfig
from mebt.core.sampling import PRESETS, num_forward_passes, preset, sample
from mebt.fsutil import seed_everything

GRIDS = {"16f": (4, 16, 16), "128f": (32, 16, 16)}
# --quick keeps the two lengths distinct but small; the presets' chunk counts (up to 32) and bootstrap (64)
# still divide / fit these grids.
QUICK_GRIDS = {"16f": (2, 8, 8), "128f": (4, 8, 8)}
TARGET_RATIO_128F = 10.0


def grid_for(preset_name: str, quick: bool) -> tuple[int, int, int]:
    length = preset_name.rsplit("_", 1)[-1]
    return (QUICK_GRIDS if quick else GRIDS)[length]


def build(cls, grid, env: Setup, seed: int):
    seed_everything(seed)
    return cls(MeBTConfig(latent_shape=grid, numerics="preln", **env.dims)).to(env.device).eval()


def timed(fn, env: Setup) -> float:
    with autocast(env.device, env.bf16):
        return seconds(fn, env.device)


def warm_up(mebt: MeBT, ar: AutoregressiveTransformer, env: Setup) -> None:
    """One pass of each code path first, so one-time costs (CUDA context, kernel choice) are not timed."""
    n = mebt.cfg.block_size
    codes = torch.randint(0, mebt.cfg.vocab_size, (1, n), device=env.device)
    positions = torch.arange(n, device=env.device)[None]
    with torch.no_grad(), autocast(env.device, env.bf16):
        mebt(codes, positions[:, :1], positions[:, 1:])
        ar.generate(1, prefix=codes[:, :-2])   # a prefill over N-2 codes and two cached steps


def time_grid(grid, names: list[str], env: Setup, args) -> list[dict]:
    """Rows for the presets ``names`` on one grid; the autoregressive model is timed once for all of them."""
    mebt = build(MeBT, grid, env, args.seed)
    ar = build(AutoregressiveTransformer, grid, env, args.seed)
    warm_up(mebt, ar, env)
    n = mebt.cfg.block_size
    generator = torch.Generator(env.device).manual_seed(args.seed)
    # One prefill pass for the start token, then one cached step per remaining code: N passes.
    ar_row = {"passes": n, "seconds": timed(lambda: ar.generate(args.batch_size, generator=generator), env)}
    rows = []
    for name in names:
        cfg = preset(name)
        secs = timed(lambda: sample(mebt, cfg, args.batch_size, generator=generator), env)
        rows.append({"preset": name, "grid": list(grid), "tokens": n,
                     "mebt": {"passes": num_forward_passes(cfg, n), "seconds": secs}, "ar": ar_row,
                     "ratio": ratio(ar_row["seconds"], secs)})
        print(f"  {name}: mebt {secs:.2f} s, autoregressive {ar_row['seconds']:.2f} s", flush=True)
    return rows


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["sky_16f", "sky_128f"], choices=sorted(PRESETS),
                   help="MeBT sampling presets (default: sky_16f sky_128f)")
    p.add_argument("--batch-size", type=int, default=1)
    add_common_args(p)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    return run_benchmark(parse_args(argv), run)


def run(args: argparse.Namespace, env: Setup) -> dict:
    print(f"{env.header()}; batch {args.batch_size}")

    by_grid: dict[tuple, list[str]] = {}
    for name in args.presets:
        by_grid.setdefault(grid_for(name, args.quick), []).append(name)
    rows = [row for grid, names in by_grid.items() for row in time_grid(grid, names, env, args)]

    headers = ["preset", "grid", "N", "mebt passes", "mebt s", "AR passes", "AR s", "AR/mebt"]
    print_table(headers, [[r["preset"], "x".join(map(str, r["grid"])), str(r["tokens"]), str(r["mebt"]["passes"]),
                           f"{r['mebt']['seconds']:.2f}", str(r["ar"]["passes"]), f"{r['ar']['seconds']:.2f}",
                           f"{r['ratio']:.1f}"] for r in rows])
    long_rows = [r for r in rows if r["preset"].endswith("_128f")]
    if long_rows:
        print("targets (the paper's claim for 128-frame videos):")
        for r in long_rows:
            print_target(f"{r['preset']} AR/mebt time", r["ratio"], ">=", TARGET_RATIO_128F)

    return {"benchmark": "generation", **env.describe(), "batch_size": args.batch_size, "rows": rows}


if __name__ == "__main__":
    main()
