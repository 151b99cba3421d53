"""Small sharded datasets and helpers for the loader tests: every code names its sample, so a batch says
which clips it holds."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from data_pipeline.loader import LoaderConfig
from data_pipeline.manifest import DATASET_JSON, MANIFEST, SAMPLE_SCHEMA, SHARD_SCHEMA, SHARDS
from data_pipeline.shard_format import ShardWriter, read_shard, shard_name
from mebt.fsutil import file_sha256

GRID = (2, 4, 4)
VOCAB = 1000


def clip_codes(n: int, frames: int = GRID[0]) -> np.ndarray:
    """Sample n's grid: every code encodes (n, position), so a batch row names the sample it came from."""
    size = frames * GRID[1] * GRID[2]
    return ((n * 7 + np.arange(size)) % VOCAB).reshape(frames, *GRID[1:])


def build_dataset(root, shard_sizes, frames=None, splits=None, prefix="train"):
    """A dataset directory as mebt preprocess leaves it: shards, manifest.parquet, shards.parquet, dataset.json.

    Sample n (numbered across shards) has key ``clipN``, video ``vidN//3``, ``start`` n and T' ``frames[n]``.
    """
    root.mkdir(parents=True, exist_ok=True)
    rows, shard_rows, n = [], [], 0
    for s, size in enumerate(shard_sizes):
        name = shard_name(prefix, s)
        with ShardWriter(root / name) as writer:
            for i in range(size):
                t = frames[n] if frames else GRID[0]
                meta = {"video_id": f"vid{n // 3}", "split": splits[n] if splits else "train", "start": n,
                        "stride": 2, "fps": 8.0, "source": f"/videos/vid{n // 3}.mp4"}
                writer.write(f"clip{n}", clip_codes(n, t), meta)
                rows.append({"shard": name, "key": f"clip{n}", "index": i, "grid_t": t, "grid_h": GRID[1],
                             "grid_w": GRID[2], **meta})
                n += 1
        shard_rows.append({"shard": name, "num_samples": size, "bytes": (root / name).stat().st_size,
                           "sha256": file_sha256(root / name)})
    pq.write_table(pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA), root / MANIFEST)
    pq.write_table(pa.Table.from_pylist(shard_rows, schema=SHARD_SCHEMA), root / SHARDS)
    info = {"complete": True, "codebook_size": VOCAB, "grid": list(GRID), "counts": {"clips": n}}
    (root / DATASET_JSON).write_text(json.dumps(info))
    return root


def sample_ids(batch) -> list[int]:
    """The sample number behind every row of a batch, from its key (``check_codes`` checks the codes match)."""
    return [int(k[len("clip"):]) for k in batch["key"]]


def config(root, **kw) -> LoaderConfig:
    return LoaderConfig(data_dir=str(root), **{"batch_size": 4, "shuffle_buffer": 8, **kw})


def take(loader, n: int) -> list[dict]:
    """The next n batches across epochs, leaving the loop early like a trainer that stops at a step count."""
    out = []
    while len(out) < n:
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                break
    return out


def check_codes(batch, frames=None) -> None:
    """Every row holds the codes of the sample its key names, cropped at its frame offset."""
    length = batch["codes"].shape[1]
    for row, n, offset in zip(batch["codes"], sample_ids(batch), batch["frame_offset"].tolist()):
        full = clip_codes(n, frames[n] if frames else GRID[0])
        assert torch.equal(row, torch.from_numpy(full[offset:offset + length]))


def assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert (a["epoch"], a["batch_index"], a["key"]) == (b["epoch"], b["batch_index"], b["key"])
        for name in ("codes", "frame_offset", "pad", "start"):
            assert torch.equal(a[name], b[name])


def padded_dataset(tmp_path, damaged: bool):
    """44 clips of 4 frames in 4 shards (one truncated if ``damaged``) and a 2-worker config that crops them
    to 2 frames and pads the epoch: 6 batches per rank of 2."""
    root = build_dataset(tmp_path / "ds", [9, 14, 6, 15], frames=[4] * 44)
    if damaged:
        damage(root / "train-000001.tar", "truncate")
    return root, config(root, num_workers=2, crop_frames=2, drop_last=False)


def global_steps(loaders: list, accum: int, steps: int) -> list[dict]:
    """The next ``steps`` global batches of ranks that step together: every rank's ``accum`` micro-batches
    of a step, rank by rank."""
    from data_pipeline.elastic import concat_batches

    streams = [iter(_forever(loader)) for loader in loaders]
    return [concat_batches([next(stream) for stream in streams for _ in range(accum)]) for _ in range(steps)]


def _forever(loader):
    while True:
        yield from loader


def damage(path, how: str) -> None:
    if how == "swap":
        # Same bytes count, the first two samples in the other order: only the key check can tell.
        samples = list(read_shard(path))
        samples[:2] = samples[1::-1]
        with ShardWriter(path) as writer:
            for key, codes, meta in samples:
                writer.write(key, codes, meta)
        return
    data = bytearray(path.read_bytes())
    if how == "truncate":
        data = data[:len(data) // 2]
    else:
        # The high byte of the first code of the first clip: 512-byte tar header, 128-byte .npy header.
        data[512 + 128 + 1] ^= 0x7F if how == "out_of_range" else 0x01
    path.write_bytes(bytes(data))
