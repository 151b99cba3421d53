"""Preprocessing throughput: clips/s from synthetic mp4 videos to WebDataset code shards.

Three rates are measured on the same clips: decoding + resizing alone (``iter_clips``), the tokenizer's
batched encoding alone (random clips of the same shape, after a warm-up batch), and ``preprocess`` end
to end (tokenizer load, decoding, encoding, shard and manifest writing, merge). Without ``--tokenizer``
the tokenizer has the released TATS 4x8x8 architecture with random weights, which costs the same.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import Setup, describe_device, print_table, run_benchmark, seconds
from data_pipeline.preprocess import PreprocessConfig, preprocess
from data_pipeline.synthetic_videos import SynthConfig, write_synthetic_dataset
from data_pipeline.video import ClipConfig, iter_clips, list_videos
from mebt.fsutil import seed_everything
from mebt.tokenizer.checkpoint import load_tokenizer, save_tokenizer
from mebt.tokenizer.vqgan import VQGAN, VQGANConfig

# (videos, sequence length, resolution, tokenizer config) per size. Each video yields two clips.
SIZES = {
    "quick": (4, 4, 16, VQGANConfig(embedding_dim=8, n_codes=32, n_hiddens=4, downsample=(2, 4, 4), num_groups=4)),
    "cpu": (8, 16, 64, VQGANConfig()),
    "paper": (32, 16, 128, VQGANConfig()),
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny tokenizer and videos that run in seconds (for tests)")
    p.add_argument("--paper", dest="paper_width", action="store_true",
                   help="16-frame 128x128 clips as in the paper (for a GPU)")
    p.add_argument("--tokenizer", help="a tokenizer checkpoint to use instead of a random TATS-shaped one")
    p.add_argument("--videos", type=int, help="number of synthetic videos (2 clips each)")
    p.add_argument("--workers", type=int, default=1, help="preprocessing worker processes")
    p.add_argument("--batch-size", type=int, default=8, help="clips per tokenizer forward pass")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--threads", type=int, nargs="+", default=None,
                   help="CPU thread counts for torch, one table each (default on CPU: 1 and all cores; 1 with --quick)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return p.parse_args(argv)


def _encode_rate(model, clip: ClipConfig, batch_size: int, n_clips: int, device: torch.device) -> float:
    """Clips/s of batched encoding alone, after one untimed warm-up batch."""
    video = torch.rand(batch_size, 3, clip.sequence_length, clip.resolution, clip.resolution, device=device) - 0.5
    batches = max(1, n_clips // batch_size)
    with torch.no_grad():
        model.encode(video)
        secs = seconds(lambda: [model.encode(video) for _ in range(batches)], device)
    return batches * batch_size / secs


def _decode_rate(videos: Path, clip: ClipConfig) -> tuple[int, float]:
    start = time.perf_counter()
    n_clips = sum(1 for _ in iter_clips(list_videos(videos, "train"), clip))
    return n_clips, n_clips / (time.perf_counter() - start)


def run(args, env: Setup) -> dict:
    with tempfile.TemporaryDirectory(prefix="preprocess-bench-") as work:
        return measure(args, env.width, env.device, Path(work))


def measure(args, size: str, device: torch.device, work: Path) -> dict:
    n_videos, length, resolution, tok_cfg = SIZES[size]
    n_videos = args.videos or n_videos
    clip = ClipConfig(sequence_length=length, resolution=resolution, all_stride=length)
    write_synthetic_dataset(work / "videos", SynthConfig(num_videos=n_videos, frames=2 * length, resolution=resolution,
                                                         test_fraction=0.0), progress=False)
    tokenizer = Path(args.tokenizer) if args.tokenizer else work / "tokenizer.pt"
    if not args.tokenizer:
        seed_everything(0)
        save_tokenizer(VQGAN(tok_cfg), tokenizer)
    print(f"device: {describe_device(device)}; {n_videos} videos, clips {length}x{resolution}x{resolution}, "
          f"batch {args.batch_size}, {args.workers} workers")

    n_clips, decode_rate = _decode_rate(work / "videos", clip)
    encode_rate = _encode_rate(load_tokenizer(tokenizer).to(device).eval(), clip, args.batch_size, n_clips, device)
    result = preprocess(PreprocessConfig(input_dir=str(work / "videos"), out_dir=str(work / "codes"),
                                         tokenizer=str(tokenizer), clip=clip, videos_per_shard=4,
                                         workers=args.workers, batch_size=args.batch_size, device=str(device),
                                         progress=False))
    print_table(["stage", "clips", "clips/s"], [
        ["decode + resize", str(n_clips), f"{decode_rate:.1f}"],
        ["encode (tokenizer)", str(n_clips), f"{encode_rate:.1f}"],
        ["preprocess end to end", str(result["clips"]), f"{result['clips_per_s']:.1f}"],
    ])
    return {"benchmark": "preprocess_throughput", "size": size, "device": describe_device(device),
            "videos": n_videos, "clip": {"sequence_length": length, "resolution": resolution},
            "tokenizer": str(args.tokenizer or f"random {list(tok_cfg.downsample)} n_hiddens {tok_cfg.n_hiddens}"),
            "batch_size": args.batch_size, "workers": args.workers, "clips": result["clips"],
            "decode_clips_per_s": decode_rate, "encode_clips_per_s": encode_rate,
            "preprocess_clips_per_s": result["clips_per_s"], "preprocess_seconds": result["seconds"]}


def main(argv=None) -> dict:
    # run_benchmark applies --threads and writes --json; its width ('quick', 'cpu', 'paper') picks SIZES.
    return run_benchmark(parse_args(argv), run)


if __name__ == "__main__":
    main()
