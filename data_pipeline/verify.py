"""Check a preprocessed dataset against its manifest (``mebt data verify``) and summarize it (``mebt data stats``).

Verification reads every shard: it must exist, have the size and sha256 the manifest recorded, parse as
a tar of complete samples whose keys and order match the manifest, and hold int16 code grids of the
dataset's shape with every code inside the codebook, next to JSON metadata that matches the manifest
row. Shards that look like this dataset's but are not in the manifest are reported too. Every bad shard
gets one line naming it and its problems. A dataset of 0 clips fails too: there is nothing to train on.
"""
from __future__ import annotations

import hashlib
import math
import tarfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_pipeline.manifest import META_FIELDS, DatasetError, expected_shards
from data_pipeline.shard_format import CODES_DTYPE, read_shard
from data_pipeline.sources import FetchError, ShardSource
from mebt.fsutil import file_sha256

# Problems listed per shard before the rest are only counted: one line per shard stays readable.
MAX_PROBLEMS_PER_SHARD = 3
TOP_CODES = 10


@dataclass
class VerifyReport:
    dataset: str
    shards_checked: int = 0
    samples_checked: int = 0
    problems: dict[str, list[str]] = field(default_factory=dict)   # shard name -> its problems
    empty: bool = False                                             # the manifest lists no clips

    @property
    def ok(self) -> bool:
        return not self.problems and not self.empty

    def lines(self) -> list[str]:
        """One line per bad shard: its name and problems."""
        out = []
        for shard, problems in sorted(self.problems.items()):
            shown = "; ".join(problems[:MAX_PROBLEMS_PER_SHARD])
            more = len(problems) - MAX_PROBLEMS_PER_SHARD
            out.append(f"{shard}: {shown}" + (f" (and {more} more problems)" if more > 0 else ""))
        return out

    def summary(self) -> str:
        verdict = "OK" if self.ok else f"{len(self.problems)} bad shards"
        if self.empty:
            verdict = ("FAILED: the dataset has no clips (dataset.json lists the skipped videos); preprocess usable "
                       "videos into a new output dir")
        return f"{self.dataset}: {self.shards_checked} shards, {self.samples_checked} samples checked: {verdict}"


def _one_line(error: Exception) -> str:
    text = " ".join(str(error).split()) or "no details"
    return f"{type(error).__name__}: {text[:200]}"


def _check_sample(codes: np.ndarray, meta: dict, row: dict, info: dict) -> list[str]:
    problems = []
    if codes.dtype != CODES_DTYPE:
        problems.append(f"dtype {codes.dtype}, expected {np.dtype(CODES_DTYPE)}")
    if list(codes.shape) != info["grid"]:
        problems.append(f"shape {list(codes.shape)}, expected {info['grid']}")
    elif codes.size and (codes.min() < 0 or codes.max() >= info["codebook_size"]):
        problems.append(f"codes in [{codes.min()}, {codes.max()}], outside the codebook [0, {info['codebook_size']})")
    wrong = [name for name in META_FIELDS if meta.get(name) != row[name]]
    if wrong:
        problems.append(f"json fields {', '.join(wrong)} differ from the manifest")
    return [f"sample '{row['key']}': {p}" for p in problems]


def _check_contents(shard: Path | bytes, rows: list[dict], info: dict) -> tuple[list[str], int]:
    """Problems with the samples of one shard (a file, or the bytes fetched from a URL), and how many
    samples were read."""
    problems, count = [], 0
    try:
        for count, (key, codes, meta) in enumerate(read_shard(shard), start=1):
            if count > len(rows):
                continue   # counted below; the manifest has no row to compare against
            row = rows[count - 1]
            if key != row["key"]:
                problems.append(f"sample {count - 1} has key '{key}', the manifest lists '{row['key']}' there")
            else:
                problems += _check_sample(codes, meta, row, info)
    except (tarfile.TarError, ValueError, EOFError, OSError) as e:
        problems.append(f"unreadable after {count} samples ({_one_line(e)})")
    if count != len(rows):
        problems.append(f"holds {count} samples, the manifest lists {len(rows)}")
    return problems, count


def _present(source: ShardSource, info: dict, recorded: set) -> set:
    """The shards there are: a directory's files, the existing files a local spec names; at URLs (which
    cannot be listed) the recorded ones, each found or not when it is read."""
    if source.local_dir is not None:
        return {p.name for p in source.local_dir.glob(f"{info['prefix']}-*.tar")}
    if not source.remote:
        return {name for name in source.names if source.local_path(name).is_file()}
    return set(recorded)


def _read(source: ShardSource, name: str) -> tuple[Path | bytes | None, str | None]:
    """A shard as a local file or fetched bytes, or None and why not."""
    path = source.local_path(name)
    if path is not None:
        return path, None
    try:
        return source.fetch(source.shard_url(name)), None
    except FetchError as e:
        return None, f"unreadable ({e})"


def verify_dataset(out_dir: str | Path) -> VerifyReport:
    """Check every shard of a merged dataset (a directory or a shard spec, see ``data_pipeline.sources``);
    the report names each bad shard and its problems."""
    source = out_dir if isinstance(out_dir, ShardSource) else ShardSource(str(out_dir))
    info, manifest, shards = source.read_tables()
    report = VerifyReport(str(source), empty=manifest.num_rows == 0)
    rows_by_shard = defaultdict(list)
    for row in manifest.to_pylist():
        rows_by_shard[row["shard"]].append(row)
    recorded = {row["shard"]: row for row in shards.to_pylist()}
    present = _present(source, info, set(recorded))
    names = set(recorded) | set(rows_by_shard) | set(expected_shards(info)) | present
    for name in sorted(names):
        problems = []
        if name not in recorded:
            problems.append("not in the manifest" if name in present else "not in shards.parquet")
        elif name not in present:
            problems.append("missing")
        else:
            summary, rows = recorded[name], sorted(rows_by_shard[name], key=lambda r: r["index"])
            if summary["num_samples"] != len(rows):
                problems.append(f"shards.parquet says {summary['num_samples']} samples, "
                                f"manifest.parquet lists {len(rows)}")
            shard, why = _read(source, name)
            if shard is None:
                report.problems[name] = problems + [why]
                continue
            contents, count = _check_contents(shard, rows, info)
            problems += contents
            size = shard.stat().st_size if isinstance(shard, Path) else len(shard)
            if size != summary["bytes"]:
                problems.append(f"{size} bytes, the manifest recorded {summary['bytes']}")
            elif (file_sha256(shard) if isinstance(shard, Path) else hashlib.sha256(shard).hexdigest()) \
                    != summary["sha256"]:
                problems.append("sha256 differs from the manifest")
            report.shards_checked += 1
            report.samples_checked += count
        if problems:
            report.problems[name] = problems
    return report


def _code_usage(counts: np.ndarray) -> dict:
    total = int(counts.sum())
    probs = counts[counts > 0] / max(total, 1)
    top = np.argsort(-counts, kind="stable")[:TOP_CODES]
    return {
        "used_codes": int((counts > 0).sum()),
        "codebook_size": len(counts),
        "perplexity": float(math.exp(-(probs * np.log(probs)).sum())) if total else 0.0,
        "top_codes": [[int(c), float(counts[c] / total)] for c in top if counts[c] > 0],
    }


def dataset_stats(out_dir: str | Path) -> dict:
    """Counts, sizes and codebook usage of a merged dataset, a directory or shard spec (reads every shard for
    the code histogram)."""
    source = out_dir if isinstance(out_dir, ShardSource) else ShardSource(str(out_dir))
    info, manifest, shards = source.read_tables()
    counts = np.zeros(info["codebook_size"], dtype=np.int64)
    for name in shards.column("shard").to_pylist():
        shard, why = _read(source, name)
        if shard is None:
            raise DatasetError(f"shard '{source.shard_url(name)}' is {why}; run mebt data verify")
        try:
            for key, codes, _ in read_shard(shard):
                if codes.size and (codes.min() < 0 or codes.max() >= len(counts)):   # a histogram would drop them
                    raise DatasetError(f"shard '{source.shard_url(name)}', sample '{key}': codes in [{codes.min()}, "
                                       f"{codes.max()}], outside the codebook [0, {len(counts)}); run mebt data verify")
                counts += np.bincount(codes.ravel().astype(np.int64), minlength=len(counts))
        except DatasetError:
            raise
        except (tarfile.TarError, ValueError, EOFError, OSError) as e:
            raise DatasetError(f"shard '{source.shard_url(name)}' is unreadable ({_one_line(e)}); "
                               "run mebt data verify") from None
    per_split = defaultdict(lambda: {"videos": set(), "clips": 0})
    for split, video_id in zip(manifest.column("split").to_pylist(), manifest.column("video_id").to_pylist()):
        per_split[split]["videos"].add(video_id)
        per_split[split]["clips"] += 1
    return {
        "dataset": str(source),
        "videos": len(set(manifest.column("video_id").to_pylist())),
        "clips": manifest.num_rows,
        "shards": shards.num_rows,
        "per_split": {s: {"videos": len(v["videos"]), "clips": v["clips"]} for s, v in sorted(per_split.items())},
        "skipped_videos": len(info.get("skipped_videos", [])),
        "grid": info["grid"],
        "bytes": int(sum(shards.column("bytes").to_pylist())),
        "code_usage": _code_usage(counts),
    }


def format_stats(stats: dict) -> str:
    usage = stats["code_usage"]
    splits = ", ".join(f"{s}: {v['videos']} videos / {v['clips']} clips" for s, v in stats["per_split"].items())
    top = ", ".join(f"{code} ({frac:.1%})" for code, frac in usage["top_codes"])
    return "\n".join([
        f"dataset:  {stats['dataset']}",
        f"videos:   {stats['videos']} ({stats['skipped_videos']} skipped as unreadable or too short)",
        f"clips:    {stats['clips']} in {stats['shards']} shards, {stats['bytes'] / 2**20:.2f} MiB",
        f"splits:   {splits or 'none'}",
        f"grid:     {' x '.join(map(str, stats['grid']))} codes per clip",
        f"codebook: {usage['used_codes']} / {usage['codebook_size']} codes used, perplexity {usage['perplexity']:.1f}",
        f"top codes: {top or 'none'}",
    ])
