"""Pre-tokenized training against re-encoding every clip at every step (what the official code does).

Three cases of one training step (MeBT forward, backward and AdamW step on a batch of clips), timed
interleaved (A, B, C, A, B, C, ...) ``--repeats`` times:
- ``codes``: from pre-tokenized codes, as `mebt train` reads them from shards;
- ``encode + step``: the clips (already decoded and resized) are encoded by the VQGAN first;
- ``decode + resize + encode + step``: the clips are also decoded from mp4 and resized first, in the
  training process (the official code does it in DataLoader workers: the same CPU work, elsewhere).
Each is reported as step time and as CPU-core-seconds per clip (the process's CPU time over all its
threads): the first is what a GPU waits for, the second what the CPUs next to it must supply.

The demo size runs for real: the demo's MeBT (6 layers, width 128, 4x8x8 codes of 128) and a VQGAN of the
demo tokenizer's shape (2x4x4 downsampling, 8 hidden channels) on 8-frame 32x32 clips resized from
256x256 mp4 files (the size of typical 240p sources: decoding cost follows the source, not the model). The
paper size is estimated from FLOPs, counted on the meta device (nothing is allocated): the released TATS
VQGAN encoder (4x8x8) against the paper MeBT's training step, per clip, at 16 and 128 frames.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import Setup, add_common_args, describe_device, print_table, ratio, run_benchmark, seconds
from data_pipeline.synthetic_videos import SynthConfig, write_synthetic_dataset
from data_pipeline.video import preprocess_frames, read_clip
from mebt.core.flops import mebt_train_flops
from mebt.core.model import MeBT, MeBTConfig
from mebt.core.objective import ObjectiveConfig, chunked_masked_loss, sample_masks
from mebt.fsutil import seed_everything
from mebt.tokenizer.vqgan import VQGAN, VQGANConfig

# (MeBT, VQGAN, clip frames, clip resolution, mp4 resolution) per size.
SIZES = {
    "quick": (dict(n_layer=2, n_embd=32, n_head=2, n_latent=8, vocab_size=64),
              dict(embedding_dim=16, n_codes=64, n_hiddens=4, num_groups=4, downsample=(2, 4, 4)), 4, 16, 32),
    "demo": (dict(n_layer=6, n_embd=128, n_head=4, n_latent=32, vocab_size=128),
             dict(embedding_dim=64, n_codes=128, n_hiddens=8, num_groups=8, downsample=(2, 4, 4)), 8, 32, 256),
}
CASES = ("codes", "encode + step", "decode + resize + encode + step")


def paper_flops() -> list[dict]:
    """Per clip: the released VQGAN's encoder FLOPs and the paper MeBT's training FLOPs (half the tokens
    masked, the mean of the linear schedule), at 16 and 128 frames of 128x128."""
    rows = []
    for frames in (16, 128):
        grid = (frames // 4, 16, 16)
        model = MeBTConfig(latent_shape=grid)
        n = model.block_size
        train = mebt_train_flops(model, n - n // 2, n // 2)
        with torch.device("meta"), FlopCounterMode(display=False) as counter:
            VQGAN(VQGANConfig()).encode(torch.empty(1, 3, frames, 128, 128))
        encode = counter.get_total_flops()
        rows.append({"frames": frames, "encode_gflop": encode / 1e9, "train_gflop": train / 1e9,
                     "encode_share": encode / (encode + train)})
    return rows


def build(size: str, batch: int, device: torch.device, folder: Path, seed: int):
    """The models, an optimizer, a batch of video files (path, start) and a step function per case."""
    model_dims, vq_dims, frames, resolution, source = SIZES[size]
    seed_everything(seed)
    vq = VQGAN(VQGANConfig(**vq_dims)).to(device).eval()
    grid = tuple(s // d for s, d in zip((frames, resolution, resolution), vq.cfg.downsample))
    model = MeBT(MeBTConfig(latent_shape=grid, numerics="preln", **model_dims)).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    write_synthetic_dataset(folder, SynthConfig(num_videos=batch, frames=2 * frames, resolution=source),
                            progress=False)
    files = sorted(folder.glob("*.mp4"))
    objective, generator = ObjectiveConfig(), torch.Generator().manual_seed(seed)

    def decode() -> torch.Tensor:
        return torch.stack([preprocess_frames(read_clip(path, start=frames // 2, count=frames)[0], resolution)
                            for path in files]).to(device)

    def encode(clips: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return vq.encode(clips)

    def step(codes: torch.Tensor) -> None:
        masks = sample_masks(objective, len(codes), grid, 0, generator)
        tgt = masks.tgt_idx.to(device)
        features = model.features(codes.flatten(1), masks.ctx_idx.to(device), tgt)
        loss = chunked_masked_loss(features, model.head, codes.flatten(1), tgt, n_masked=masks.n_masked)[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    clips = decode()
    codes = encode(clips)
    return {"codes": lambda: step(codes), "encode + step": lambda: step(encode(clips)),
            "decode + resize + encode + step": lambda: step(encode(decode()))}, grid


def run(args: argparse.Namespace, env: Setup) -> dict:
    size = "quick" if args.quick else "demo"
    batch = args.batch_size or (4 if args.quick else 16)
    model_dims, vq_dims = SIZES[size][:2]
    print(f"device: {describe_device(env.device)}; size '{size}': MeBT {model_dims}, VQGAN {vq_dims}; fp32; batch "
          f"{batch}; {args.repeats} interleaved repeats (min / median)")
    with tempfile.TemporaryDirectory() as tmp:
        cases, grid = build(size, batch, env.device, Path(tmp), args.seed)
        for fn in cases.values():   # warm-up: allocator, kernel choice, the page cache of the mp4 files
            fn()
        wall: dict[str, list[float]] = {name: [] for name in cases}
        cpu: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.repeats):
            for name, fn in cases.items():
                start = time.process_time()
                wall[name].append(seconds(fn, env.device))
                cpu[name].append(time.process_time() - start)
    rows = [{"case": name, "step_s": {"min": min(wall[name]), "median": statistics.median(wall[name])},
             "cpu_s_per_clip": min(cpu[name]) / batch} for name in CASES]
    base = rows[0]["step_s"]["min"]
    for row in rows:
        row["vs_codes"] = ratio(row["step_s"]["min"], base)
    print_table(["case", "step s min / med", "vs codes", "CPU-core s / clip"],
                [[r["case"], f"{r['step_s']['min']:.3f} / {r['step_s']['median']:.3f}", f"{r['vs_codes']:.2f}",
                  f"{r['cpu_s_per_clip']:.4f}"] for r in rows])
    estimate = paper_flops()
    print("paper size, estimated from FLOPs per clip (released 4x8x8 VQGAN encoder vs the paper MeBT's "
          "training step, half the tokens masked):")
    print_table(["frames", "encode GFLOP", "train GFLOP", "encode share"],
                [[str(r["frames"]), f"{r['encode_gflop']:.0f}", f"{r['train_gflop']:.0f}",
                  f"{r['encode_share']:.1%}"] for r in estimate])
    return {"benchmark": "pretokenized", "device": describe_device(env.device), "mebt": model_dims, "vqgan": vq_dims,
            "size": size, "batch_size": batch, "grid": list(grid),
            "repeats": args.repeats, "rows": rows, "paper_estimate": estimate}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=None, help="clips per step (default 16; 4 with --quick)")
    add_common_args(p)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    return run_benchmark(parse_args(argv), run)


if __name__ == "__main__":
    main()
