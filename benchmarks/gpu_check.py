"""The GPU check: the numbers a GPU should be asked for first, in minutes, into one JSON file.

Sections, in order (each records its error and the next still runs):
- ``mfu``: a paper-width (d=1024, 24 layers) bf16 training step (forward + backward) at 1024 and 8192
  tokens, half of them masked: seconds per step and MFU against the card's dense bf16 peak;
- ``train_scaling``: MeBT against full attention at the same sizes, time and peak memory
  (``benchmarks/train_scaling.py``);
- ``generation``: MeBT (official passes and the exact fixes) against the autoregressive baseline at 16
  and 128 frames, batch 1 (``benchmarks/generation.py``; one timed run each: the AR baseline alone takes
  minutes at 128 frames);
- ``loader``: the streaming loader's clips/s (``benchmarks/loader_throughput.py``).
``--quick`` runs every section at a tiny size (CPU, for the tests).
"""
from __future__ import annotations

import argparse
import time
import traceback

import torch

from benchmarks import generation, train_scaling
from benchmarks.common import Setup, add_common_args, describe_device, interleaved, run_benchmark, setup
from mebt.core.flops import mebt_train_flops, mfu, peak_flops_per_s
from mebt.core.model import MeBT, MeBTConfig
from mebt.fsutil import write_json


def mfu_rows(env: Setup, args) -> list[dict]:
    rows = []
    for tokens, batch in ((256, 2), (512, 1)) if args.quick else ((1024, 8), (8192, 1)):
        cfg = MeBTConfig(latent_shape=(tokens // 256, 16, 16), numerics="preln", **env.dims)
        torch.manual_seed(args.seed)
        model = MeBT(cfg).to(env.device).train()
        generator = torch.Generator().manual_seed(args.seed)
        data = train_scaling.make_batch(tokens, batch, cfg.vocab_size, env.device, generator)
        train_scaling.train_step(model, data, env.bf16)   # warm-up
        step = lambda model=model, data=data: train_scaling.train_step(model, data, env.bf16)   # noqa: E731
        timing = interleaved({"step": step}, args.repeats, env.device)["step"]
        flops = batch * mebt_train_flops(cfg, tokens - tokens // 2, tokens // 2)
        peak = peak_flops_per_s(env.device, torch.bfloat16 if env.bf16 else torch.float32)
        rows.append({"tokens": tokens, "batch": batch, "seconds": timing, "tflops_per_s": flops / timing["min"] / 1e12,
                     "mfu": mfu(flops / timing["min"], peak)})
        print(f"  mfu: {tokens} tokens x {batch}: {timing['min'] * 1e3:.1f} ms/step, "
              f"{rows[-1]['tflops_per_s']:.1f} TFLOP/s" + (f", MFU {rows[-1]['mfu']:.1%}" if rows[-1]["mfu"] else ""),
              flush=True)
        del model, step   # the next size's model takes its place on the GPU
    return rows


def loader_section(args) -> dict:
    from benchmarks import loader_throughput   # imported here: pyarrow is not on every GPU image

    return loader_throughput.main(["--quick"] if args.quick else ["--clips", "5000", "--epochs", "2"])


def sections(env: Setup, args) -> dict:
    common = ["--repeats", str(args.repeats), "--seed", str(args.seed), "--threads", str(torch.get_num_threads())]
    common += ["--quick"] if args.quick else ["--paper-width"]
    tokens = ["256", "512"] if args.quick else ["1024", "8192"]
    return {
        "mfu": lambda: mfu_rows(env, args),
        "train_scaling": lambda: train_scaling.run(train_scaling.parse_args(common + ["--tokens", *tokens]), env),
        "generation": lambda: generation.run(generation.parse_args(
            common[2:] + ["--presets", "sky_16f", "sky_128f", "--batch-sizes", "1", "--repeats", "1", "--no-flops",
                          "--methods", "mebt official", "mebt exact", "AR"]), env),
        "loader": lambda: loader_section(args),
    }


def run(args: argparse.Namespace, env: Setup) -> dict:
    print(f"device: {describe_device(env.device)}; width '{env.width}'; {'bf16 autocast' if env.bf16 else 'fp32'}")
    result = {"benchmark": "gpu_check", **env.describe(), "torch": torch.__version__, "sections": {}}
    for name, fn in sections(env, args).items():
        start = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            result["sections"][name] = {"result": fn()}
        except Exception as e:   # one section's failure must not cost the others' numbers
            traceback.print_exc()
            result["sections"][name] = {"error": f"{type(e).__name__}: {e}"}
        result["sections"][name]["seconds"] = time.perf_counter() - start
        if args.json:   # what is done so far survives a check stopped at a time limit
            write_json(args.json, {"benchmark": "gpu_check", "partial": True, "runs": [result]})
        if env.device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    args = p.parse_args(argv)
    if not args.quick:
        args.paper_width = True   # the point of the check: paper width in bf16
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not args.quick and setup(args).device.type != "cuda":
        print("mebt bench gpu: no CUDA device here; --quick runs the same sections at a tiny size on CPU")
    return run_benchmark(args, run)


if __name__ == "__main__":
    main()
