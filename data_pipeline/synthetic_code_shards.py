"""A dataset directory of procedural code grids, in exactly the layout ``mebt preprocess`` writes.

Training, its tests and the quick CPU configs need shards of codes without first training a tokenizer:
the grids of ``synthetic_codes`` (a moving square over a background, see there) are written as tar
shards with per-shard manifest parts, then merged, so the loader, ``mebt data verify`` and the trainer
read them like any tokenized dataset. Deterministic for a given config; a rerun with the same settings
keeps the finished shards.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from data_pipeline.manifest import FORMAT_VERSION, finished_shards, merge_manifest
from data_pipeline.preprocess import prepare_out_dir, write_code_shard
from data_pipeline.shard_format import shard_name
from data_pipeline.synthetic_codes import SyntheticCodesConfig, make_code_grids
from mebt.errors import ConfigError


@dataclass
class CodeDatasetConfig:
    codes: SyntheticCodesConfig = field(default_factory=SyntheticCodesConfig, metadata={"flags": True})
    grid: tuple[int, int, int] = (4, 8, 8)     # T', H', W'
    vocab_size: int = 8
    shard_size: int = 512                      # clips per shard
    split: str = "train"
    prefix: str = "train"

    def __post_init__(self):
        if self.shard_size < 1 or min(self.grid) < 1:
            raise ConfigError(f"shard_size and grid must be positive, got {self.shard_size} and {list(self.grid)}")
        if not 2 <= self.vocab_size <= 2 ** 15:
            raise ConfigError(f"vocab_size must be in [2, 32768] (shards hold int16 codes), got {self.vocab_size}")


@dataclass
class CodeDatasetJob(CodeDatasetConfig):
    """`mebt data synth-codes OUT`: the dataset settings and the output folder."""
    out: str = ""                              # output dataset folder


def write_code_dataset(out_dir: str | Path, cfg: CodeDatasetConfig, progress: bool = True) -> dict:
    """Write (or finish) the dataset; returns the merged counts."""
    out_dir = Path(out_dir)
    grids = make_code_grids(cfg.codes, cfg.grid, cfg.vocab_size).numpy()
    num_shards = -(-len(grids) // cfg.shard_size)
    settings = {"format_version": FORMAT_VERSION, "tokenizer_sha256": None, "codebook_size": cfg.vocab_size,
                "grid": list(cfg.grid), "clip": None, "split": cfg.split, "prefix": cfg.prefix,
                "synthetic_codes": asdict(cfg.codes), "shard_size": cfg.shard_size,
                "num_videos": len(grids), "num_shards": num_shards}
    prepare_out_dir(out_dir, settings, {})
    names = [shard_name(cfg.prefix, i) for i in range(num_shards)]
    done = finished_shards(out_dir, names)
    for i, name in enumerate(tqdm(names, desc="synthetic code shards", unit="shard", disable=not progress)):
        if name in done:
            continue
        items = ((grids[n], {"video_id": f"synth{n:06d}", "split": cfg.split, "start": 0, "stride": 1, "fps": 8.0,
                             "source": "synthetic"})
                 for n in range(i * cfg.shard_size, min((i + 1) * cfg.shard_size, len(grids))))
        write_code_shard(out_dir, name, items, cfg.grid)
    return merge_manifest(out_dir)
