"""Data loader throughput: clips/s of 1024-code clips (4x16x16 int16) streamed from local tar shards.

Writes a dataset of ``--clips`` clips into a temporary directory (so the shards sit in the page cache,
as on a warm local disk), then times whole epochs of the loader in one process and with ``--workers``
DataLoader workers, next to a raw in-memory bound: ``np.frombuffer`` over the same shard bytes, already
read, at known offsets, stacked and cast to int64 tensors batch by batch. The raw bound does no I/O,
no tar parsing, no checks, no shuffling and no metadata; the gap to it is the loader's own cost. A row
with ``verify: sha256-once`` (the default: each shard hashed the first time a process reads it) and
``sha256`` (every read) shows what hashing adds. The same dataset is then read over loopback
HTTP (``python -m http.server`` on 127.0.0.1 in its own process, serving the folder; the loader fetches
whole shards by their WebDataset spec, one prefetched): its clips/s is shown next to the local
directory's in the same run.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from benchmarks.common import print_table, print_target, ratio
from benchmarks.http_server import ServerProcess
from data_pipeline.loader import LoaderConfig, make_loader
from data_pipeline.manifest import DATASET_JSON, MANIFEST, SAMPLE_SCHEMA, SHARD_SCHEMA, SHARDS
from data_pipeline.shard_format import CODES_EXT, ShardWriter, shard_name
from data_pipeline.shard_reader import tar_members
from mebt.fsutil import file_sha256, write_json

GRID = (4, 16, 16)
VOCAB = 16384
TARGET_CLIPS_PER_S = 20_000     # per process
TARGET_FRACTION_OF_RAW = 0.5
TARGET_HTTP_FRACTION = 0.5      # loopback HTTP vs the same shards in a local directory


def write_dataset(root: Path, num_clips: int, shard_size: int, seed: int) -> None:
    """Random clips in shards of ``shard_size``, with the tables mebt preprocess writes next to them."""
    rng = np.random.default_rng(seed)
    samples, shards = [], []
    for s, first in enumerate(range(0, num_clips, shard_size)):
        name = shard_name("bench", s)
        with ShardWriter(root / name) as writer:
            for i, n in enumerate(range(first, min(first + shard_size, num_clips))):
                meta = {"video_id": f"v{n // 8}", "split": "train", "start": 16 * (n % 8), "stride": 1,
                        "fps": 8.0, "source": f"/videos/v{n // 8}.mp4"}
                writer.write(f"c{n}", rng.integers(0, VOCAB, GRID), meta)
                samples.append({"shard": name, "key": f"c{n}", "index": i, "grid_t": GRID[0], "grid_h": GRID[1],
                                "grid_w": GRID[2], **meta})
        shards.append({"shard": name, "num_samples": writer.count, "bytes": (root / name).stat().st_size,
                       "sha256": file_sha256(root / name)})
    pq.write_table(pa.Table.from_pylist(samples, schema=SAMPLE_SCHEMA), root / MANIFEST)
    pq.write_table(pa.Table.from_pylist(shards, schema=SHARD_SCHEMA), root / SHARDS)
    write_json(root / DATASET_JSON, {"complete": True, "codebook_size": VOCAB, "grid": list(GRID)})


def raw_bound(root: Path, batch_size: int) -> tuple[int, float]:
    """(clips, seconds) to turn the in-memory shard bytes into int64 batches, offsets found beforehand."""
    header = 128   # np.save's header for a small int16 array: 10 bytes of magic and lengths, padded to 128
    clips = []
    for path in sorted(root.glob("bench-*.tar")):
        buf = path.read_bytes()
        names, offsets, _ = tar_members(buf)
        clips += [(buf, off + header) for off in offsets[np.char.endswith(names, CODES_EXT.encode())].tolist()]
    count = int(np.prod(GRID))
    start = time.perf_counter()
    for first in range(0, len(clips), batch_size):
        batch = np.stack([np.frombuffer(buf, np.int16, count, off) for buf, off in clips[first:first + batch_size]])
        torch.from_numpy(batch.astype(np.int64)).view(-1, *GRID)
    return len(clips), time.perf_counter() - start


def time_loader(root: Path | str, args: argparse.Namespace, workers: int,
                verify: str = "size") -> tuple[int, float, float]:
    """(clips, seconds of the fastest epoch, seconds of the first) over ``--epochs`` whole epochs, worker
    start-up included. The first epoch also parses and checks every shard's tar layout; later epochs reuse
    it, in the main process and in the workers alike (they live across epochs)."""
    loader = make_loader(LoaderConfig(data_dir=str(root), batch_size=args.batch_size, num_workers=workers,
                                      shuffle_buffer=args.shuffle_buffer, seed=args.seed, verify=verify), 0, 1,
                         expect_grid=GRID, expect_vocab=VOCAB)
    times = []
    for _ in range(args.epochs):
        start = time.perf_counter()
        clips = sum(len(batch["codes"]) for batch in loader)
        times.append(time.perf_counter() - start)
    return clips, min(times), times[0]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=None, help="clips in the dataset (default 20000; 2000 with --quick)")
    p.add_argument("--shard-size", type=int, default=1000, help="clips per shard")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--shuffle-buffer", type=int, default=1000)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for the second loader row")
    p.add_argument("--epochs", type=int, default=None, help="epochs per loader row, the fastest is kept "
                                                           "(default 3; 1 with --quick)")
    p.add_argument("--dir", help="write the shards here instead of a temporary directory")
    p.add_argument("--quick", action="store_true", help="a small dataset that runs in seconds (for tests)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.clips = args.clips or (2000 if args.quick else 20_000)
    args.epochs = args.epochs or (1 if args.quick else 3)
    if args.quick:
        args.shard_size = min(args.shard_size, 250)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        write_dataset(root, args.clips, args.shard_size, args.seed)
        result = run(root, args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return result


def run(root: Path, args: argparse.Namespace) -> dict:
    load = os.getloadavg()[0]
    print(f"{args.clips} clips of {'x'.join(map(str, GRID))} int16 codes in shards of {args.shard_size}; batch "
          f"{args.batch_size}; {os.cpu_count()} cores, load average {load:.1f} (other processes share them)")
    rows = []
    raw_clips, raw_seconds = raw_bound(root, args.batch_size)
    names = sorted(p.name for p in root.glob("bench-*.tar"))
    with ServerProcess(root) as server:
        http = f"{server.url}/bench-{{{names[0][6:12]}..{names[-1][6:12]}}}.tar"
        timed = [("raw in-memory bound", 0, None, (raw_clips, raw_seconds, raw_seconds)),
                 ("loader, 1 process", 0, "size", time_loader(root, args, 0)),
                 ("loader, 1 process, HTTP", 0, "size", time_loader(http, args, 0)),
                 ("loader, 1 worker", 1, "size", time_loader(root, args, 1)),
                 ("loader, 1 worker, HTTP", 1, "size", time_loader(http, args, 1)),
                 ("loader, 1 process, sha256 once (default)", 0, "sha256-once",
                  time_loader(root, args, 0, "sha256-once")),
                 ("loader, 1 process, sha256 every read", 0, "sha256", time_loader(root, args, 0, "sha256")),
                 (f"loader, {args.workers} workers", args.workers, "size", time_loader(root, args, args.workers))]
    for name, workers, verify, (clips, seconds, first) in timed:
        rows.append({"name": name, "workers": workers, "verify": verify, "clips": clips, "seconds": seconds,
                     "clips_per_s": ratio(clips, seconds), "first_epoch_clips_per_s": ratio(clips, first)})
    raw = rows[0]["clips_per_s"]
    for row in rows:
        row["fraction_of_raw"] = ratio(row["clips_per_s"], raw)
        row["first_epoch_fraction_of_raw"] = ratio(row["first_epoch_clips_per_s"], raw)
    print_table(["", "clips", "seconds", "clips/s", "of raw", "1st epoch clips/s", "of raw"],
                [[r["name"], str(r["clips"]), f"{r['seconds']:.3f}", f"{r['clips_per_s']:,.0f}",
                  f"{r['fraction_of_raw']:.0%}", f"{r['first_epoch_clips_per_s']:,.0f}",
                  f"{r['first_epoch_fraction_of_raw']:.0%}"] for r in rows])
    single, http_single, worker, http_worker = rows[1:5]
    print("targets (the loader with verify: size, in one process, fastest epoch; the first epoch also "
          "parses every tar):")
    print_target("loader clips/s in one process", single["clips_per_s"], ">=", TARGET_CLIPS_PER_S)
    print_target("loader fraction of the raw bound", single["fraction_of_raw"], ">=", TARGET_FRACTION_OF_RAW)
    print_target("loopback HTTP clips/s as a fraction of the local directory's, 1 worker",
                 ratio(http_worker["clips_per_s"], worker["clips_per_s"]), ">=", TARGET_HTTP_FRACTION)
    print(f"  (in the main process, no worker: HTTP {ratio(http_single['clips_per_s'], single['clips_per_s']):.2f} of "
          "local, whose mapped page-cache reads are nearly free)")
    return {"benchmark": "loader_throughput", "grid": list(GRID), "clips": args.clips, "shard_size": args.shard_size,
            "batch_size": args.batch_size, "cpu_count": os.cpu_count(), "load_average": load, "rows": rows,
            "http_fraction_of_local": {"1_worker": ratio(http_worker["clips_per_s"], worker["clips_per_s"]),
                                       "main_process": ratio(http_single["clips_per_s"], single["clips_per_s"])},
            "targets": {"clips_per_s": TARGET_CLIPS_PER_S, "fraction_of_raw": TARGET_FRACTION_OF_RAW,
                        "http_fraction_of_local": TARGET_HTTP_FRACTION}}


if __name__ == "__main__":
    main()
