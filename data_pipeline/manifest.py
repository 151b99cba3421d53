"""The tables that describe a preprocessed dataset directory, and merging the per-shard parts into them.

A dataset directory holds, next to its shards:

- ``dataset.json``: the settings every shard was made with (tokenizer sha256, codebook size, code grid,
  clip settings, split, prefix, how videos map to shards) and, once merged, the counts and skipped videos;
- ``manifest-parts/PREFIX-000000.parquet``, ...: one part per finished shard, written by the task that
  made the shard right after it. Its rows are the shard's samples; its schema metadata holds the shard's
  size, sha256 and the videos skipped in it. Parts are per shard, not per task, so a killed task loses
  at most the shard it was writing, and the merge does not depend on how many tasks did the work;
- ``manifest.parquet`` (one row per sample) and ``shards.parquet`` (one row per shard): the merged parts.

Every file here is written under a temporary name and renamed, so concurrent tasks never see half a file.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline.shard_format import shard_name
from mebt.errors import UserError
from mebt.fsutil import atomic_write, file_sha256, write_bytes

FORMAT_VERSION = 1
DATASET_JSON = "dataset.json"
MANIFEST = "manifest.parquet"
SHARDS = "shards.parquet"
PARTS_DIR = "manifest-parts"
_PART_META_KEY = b"mebt.shard"

SAMPLE_SCHEMA = pa.schema([
    ("shard", pa.string()), ("key", pa.string()), ("index", pa.int32()),
    ("video_id", pa.string()), ("split", pa.string()), ("start", pa.int64()), ("stride", pa.int32()),
    ("fps", pa.float64()), ("source", pa.string()),
    ("grid_t", pa.int32()), ("grid_h", pa.int32()), ("grid_w", pa.int32()),
])
SHARD_SCHEMA = pa.schema([
    ("shard", pa.string()), ("num_samples", pa.int64()), ("bytes", pa.int64()), ("sha256", pa.string()),
])
# The per-sample fields a shard's ``KEY.json`` carries; verify compares them with the manifest.
META_FIELDS = ("video_id", "split", "start", "stride", "fps", "source")


class DatasetError(UserError):
    """A dataset directory that is missing, incomplete or inconsistent; the message names the file and fix."""


def _write_table(path: Path, table: pa.Table) -> None:
    with atomic_write(path) as tmp:
        pq.write_table(table, tmp)


def read_dataset_json(out_dir: str | Path) -> dict:
    path = Path(out_dir) / DATASET_JSON
    if not path.is_file():
        raise DatasetError(f"'{out_dir}' is not a preprocessed dataset: {DATASET_JSON} is missing "
                           "(run mebt preprocess)")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise DatasetError(f"'{path}' is not valid JSON ({e}); rerun mebt preprocess into a new directory") from None


def write_dataset_json(out_dir: str | Path, info: dict) -> None:
    write_bytes(Path(out_dir) / DATASET_JSON, (json.dumps(info, indent=2, sort_keys=True) + "\n").encode())


def expected_shards(info: dict) -> list[str]:
    return [shard_name(info["prefix"], i) for i in range(info["num_shards"])]


def part_path(out_dir: str | Path, shard: str) -> Path:
    return Path(out_dir) / PARTS_DIR / f"{Path(shard).stem}.parquet"


def write_part(out_dir: str | Path, shard: str, rows: list[dict], skipped: list[dict]) -> dict:
    """Record a finished shard (already renamed into place) and return its shards-table row."""
    shard_path = Path(out_dir) / shard
    summary = {"shard": shard, "num_samples": len(rows), "bytes": shard_path.stat().st_size,
               "sha256": file_sha256(shard_path)}
    meta = json.dumps({**summary, "skipped": skipped}, sort_keys=True).encode()
    table = pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA.with_metadata({_PART_META_KEY: meta}))
    path = part_path(out_dir, shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_table(path, table)
    return summary


def read_part(path: Path) -> tuple[pa.Table, dict]:
    """(sample rows, {shard, num_samples, bytes, sha256, skipped}) of one part file."""
    try:
        table = pq.read_table(path)
        meta = json.loads(table.schema.metadata[_PART_META_KEY])
    except (OSError, pa.ArrowException, KeyError, ValueError, TypeError) as e:
        raise DatasetError(f"manifest part '{path}' is unreadable ({type(e).__name__}); delete it and rerun "
                           "mebt preprocess to remake its shard") from None
    return table.replace_schema_metadata(None), meta


def finished_shards(out_dir: str | Path, shards: list[str]) -> set[str]:
    """The shards whose tar and manifest part both exist: a rerun skips these."""
    out_dir = Path(out_dir)
    return {s for s in shards if (out_dir / s).is_file() and part_path(out_dir, s).is_file()}


def _list_names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _no_clips(out_dir: Path, info: dict, skipped: list[dict]) -> str:
    """The one line for a dataset whose videos were all left out: where, how many and why."""
    reasons = Counter(s.get("why", "unreadable or too short") for s in skipped)
    why = ", ".join(f"{n} {reason}" for reason, n in reasons.most_common()) or "none left out"
    return (f"split '{info['split']}' of '{info.get('input_dir', out_dir)}' has no usable clips: "
            f"{info['num_videos']} videos tried, {why}; fix the videos (the warnings name each) or shorten the "
            f"clips (--sequence-length, --frame-stride), then preprocess into a new output dir")


def merge_manifest(out_dir: str | Path) -> dict:
    """Merge every shard's part into manifest.parquet and shards.parquet and complete dataset.json.

    Checks that every expected shard exists, matches its part's size, that every shard and sample key is
    listed exactly once and that there is at least one sample (every task's shards are known only here);
    returns the counts written to dataset.json.
    """
    out_dir = Path(out_dir)
    info = read_dataset_json(out_dir)
    shards = expected_shards(info)
    unfinished = sorted(set(shards) - finished_shards(out_dir, shards))
    if unfinished:
        raise DatasetError(f"cannot merge '{out_dir}': {len(unfinished)} of {len(shards)} shards are not finished "
                           f"({_list_names(unfinished)}); rerun mebt preprocess with the same settings for them")
    tables, summaries, skipped = [], [], []
    for shard in shards:
        table, meta = read_part(part_path(out_dir, shard))
        listed = set(table.column("shard").to_pylist())
        if meta["shard"] != shard or listed - {shard} or meta["num_samples"] != table.num_rows:
            raise DatasetError(f"manifest part for '{shard}' describes another shard or miscounts its samples; "
                               "delete the part and rerun mebt preprocess")
        if (out_dir / shard).stat().st_size != meta["bytes"]:
            raise DatasetError(f"shard '{shard}' changed size since it was written; delete it and its manifest "
                               "part and rerun mebt preprocess")
        tables.append(table)
        summaries.append({k: meta[k] for k in SHARD_SCHEMA.names})
        skipped.extend(meta["skipped"])
    manifest = pa.concat_tables(tables) if tables else SAMPLE_SCHEMA.empty_table()
    if manifest.num_rows == 0:
        raise DatasetError(_no_clips(out_dir, info, skipped))
    keys = manifest.column("key").to_pylist()
    if len(set(keys)) != len(keys):
        raise DatasetError(f"'{out_dir}' lists some sample keys more than once; preprocess into a new directory")
    _write_table(out_dir / MANIFEST, manifest)
    _write_table(out_dir / SHARDS, pa.Table.from_pylist(summaries, schema=SHARD_SCHEMA))
    counts = {
        "videos_listed": info["num_videos"],
        "videos": len(set(manifest.column("video_id").to_pylist())),
        "clips": manifest.num_rows,
        "shards": len(shards),
        "bytes": sum(s["bytes"] for s in summaries),
        "skipped_videos": len(skipped),
    }
    write_dataset_json(out_dir, {**info, "complete": True, "counts": counts, "skipped_videos": skipped})
    return counts


def load_tables(out_dir: str | Path) -> tuple[dict, pa.Table, pa.Table]:
    """(dataset.json, manifest, shards table) of a merged dataset."""
    out_dir = Path(out_dir)
    info = read_dataset_json(out_dir)
    missing = [name for name in (MANIFEST, SHARDS) if not (out_dir / name).is_file()]
    if missing or not info.get("complete"):
        raise DatasetError(f"'{out_dir}' has no merged manifest ({_list_names(missing or [MANIFEST])} missing); "
                           "finish every preprocessing task or run mebt data merge DIR")
    try:
        return info, pq.read_table(out_dir / MANIFEST), pq.read_table(out_dir / SHARDS)
    except (OSError, pa.ArrowException) as e:
        raise DatasetError(f"the manifest of '{out_dir}' is unreadable ({e}); run mebt data merge DIR") from None
