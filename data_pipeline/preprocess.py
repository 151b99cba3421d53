"""Videos -> clips -> tokenizer codes -> WebDataset shards, in parallel and resumable.

Assignment of work (deterministic, so every SLURM task and every rerun agrees on it):

- the split's videos are listed and sorted by video id;
- shard ``i`` holds the clips of videos ``[i * videos_per_shard, (i + 1) * videos_per_shard)`` in that
  order. Grouping videos rather than clips lets a task know its shards without decoding any video, and
  an unreadable video only makes its own shard smaller instead of shifting every later shard;
- shard ``i`` belongs to task ``i % num_tasks``; within a task, ``workers`` processes take whole shards.

Every clip of a video is kept: starts every ``clip.all_stride`` frames, as ``iter_clips`` yields them
(``clip.starts`` only matters for training-time sampling). Sample keys are ``PREFIX-SHARD-INDEX``, e.g.
``train-000003-000017``, unique in the dataset and free of dots as WebDataset requires.

A shard is finished when its tar (written under a temporary name, then renamed) and its manifest part
(see ``manifest.py``) both exist; a rerun skips finished shards and removes temporary leftovers of the
ones it redoes. When every shard is finished the task that notices merges the manifest; only that merge
knows the total, so a dataset of 0 clips is refused there (one task's slice may well hold none).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import multiprocessing as mp
import os
import queue
import re
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from data_pipeline.manifest import (
    DATASET_JSON,
    FORMAT_VERSION,
    DatasetError,
    finished_shards,
    merge_manifest,
    part_path,
    read_dataset_json,
    write_dataset_json,
    write_part,
)
from data_pipeline.shard_format import ShardWriter, shard_name
from data_pipeline.video import ClipConfig, VideoEntry, iter_clips, list_videos
from mebt.config import refuse_changed_settings
from mebt.errors import ConfigError, UserError
from mebt.fsutil import leftovers
from mebt.logs import ensure_logging
from mebt.tokenizer.checkpoint import load_tokenizer, tokenizer_sha256

# The prefix names files and starts every sample key, which WebDataset splits at the first dot.
_PREFIX_RE = re.compile(r"[A-Za-z0-9_-]+")

log = logging.getLogger(__name__)


class PreprocessError(UserError):
    """Bad preprocessing input (missing files, no videos, settings the tokenizer cannot take)."""


@dataclass
class PreprocessConfig:
    input_dir: str = ""                   # folder of videos (with train.txt/test.txt) or frame folders
    out_dir: str = field(default="", metadata={"flag": "out"})   # dataset output folder
    tokenizer: str = ""                   # tokenizer checkpoint (TATS VQGAN .ckpt or `mebt tokenizer train` output)
    split: str = "train"
    prefix: str | None = None             # shard name prefix; default: the split
    clip: ClipConfig = field(default_factory=ClipConfig, metadata={"flags": True})
    include_gif: bool = False             # take .gif files when scanning a folder (off: they are usually previews)
    skip_missing: bool = False            # leave out, with a warning, videos a split file lists that do not exist
    videos_per_shard: int = 64
    workers: int = 1                      # encoding processes on this machine
    batch_size: int = 8                   # clips per tokenizer forward pass
    task_index: int = 0                   # this task's index in a SLURM array ...
    num_tasks: int = 1                    # ... of this many tasks
    device: str | None = None             # default: cuda when available
    progress: bool = True                 # tqdm bar with clips/s on stderr

    def __post_init__(self):
        for key in ("input_dir", "out_dir", "tokenizer", "split"):
            if not getattr(self, key):
                raise ConfigError(f"config key '{key}' must be set")
        for key in ("videos_per_shard", "workers", "batch_size", "num_tasks"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key '{key}' must be positive, got {getattr(self, key)}")
        if not 0 <= self.task_index < self.num_tasks:
            raise ConfigError(f"config key 'task_index' must be in [0, num_tasks={self.num_tasks}), "
                              f"got {self.task_index}")
        if self.prefix is None:
            self.prefix = self.split
        if not _PREFIX_RE.fullmatch(self.prefix):
            raise ConfigError(f"config key 'prefix' must use only letters, digits, '_' and '-' (it names shards "
                              f"and sample keys), got {self.prefix!r}")


def _device(cfg: PreprocessConfig) -> torch.device:
    return torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _grid(cfg: PreprocessConfig, model) -> list[int]:
    """The [T', H', W'] code grid of one clip; refuses clip settings the tokenizer cannot divide."""
    ft, fh, fw = model.cfg.downsample   # (temporal, height, width) reduction factors
    clip = cfg.clip
    if clip.resolution % fh or clip.resolution % fw:
        raise PreprocessError(f"clip resolution {clip.resolution} is not divisible by the tokenizer's spatial "
                              f"downsampling {fh}x{fw}; use a multiple of {max(fh, fw)}")
    if clip.sequence_length % ft:
        raise PreprocessError(f"clip sequence length {clip.sequence_length} is not divisible by the tokenizer's "
                              f"temporal downsampling {ft}; use a multiple of {ft}")
    return [clip.sequence_length // ft, clip.resolution // fh, clip.resolution // fw]


@dataclass
class Plan:
    entries: list[VideoEntry]
    settings: dict          # what dataset.json records and a rerun must agree on
    missing: list[str]      # names the split file lists that do not exist (only with skip_missing)


def _videos_sha256(entries: list[VideoEntry], root: Path) -> str:
    listing = "\n".join(f"{e.video_id}\t{_source(e, root)}" for e in entries)
    return hashlib.sha256(listing.encode()).hexdigest()


def _source(entry: VideoEntry, root: Path) -> str:
    """The video's path relative to the input dir, so the dataset does not depend on where the data is mounted."""
    return Path(os.path.relpath(entry.path, root)).as_posix()


def plan(cfg: PreprocessConfig, model) -> Plan:
    """Check the inputs and list the split's videos in their fixed order."""
    root = Path(cfg.input_dir)
    grid = _grid(cfg, model)
    missing: list[str] = []
    listed = list_videos(root, cfg.split, cfg.include_gif, missing if cfg.skip_missing else None)
    entries = sorted(listed, key=lambda e: (e.video_id, str(e.path)))
    if not entries:
        raise PreprocessError(f"no videos in split '{cfg.split}' of '{root}' (expected {cfg.split}.txt, a "
                              f"{cfg.split}/ folder or video files)")
    settings = {
        "format_version": FORMAT_VERSION,
        "tokenizer_sha256": tokenizer_sha256(cfg.tokenizer),
        "codebook_size": int(model.cfg.n_codes),
        "grid": grid,
        "clip": dataclasses.asdict(cfg.clip),
        "split": cfg.split,
        "prefix": cfg.prefix,
        "videos_per_shard": cfg.videos_per_shard,
        "num_videos": len(entries),
        "num_shards": -(-len(entries) // cfg.videos_per_shard),
        "videos_sha256": _videos_sha256(entries, root),
    }
    return Plan(entries, json.loads(json.dumps(settings)), missing)   # JSON round trip: equal to a reread file


def prepare_out_dir(out_dir: Path, settings: dict, informational: dict) -> None:
    """Record the settings in dataset.json, or refuse an output dir made with other settings."""
    if (out_dir / DATASET_JSON).exists():
        refuse_changed_settings(f"output dir '{out_dir}' holds a dataset made with different settings",
                                read_dataset_json(out_dir), settings, "use another output dir or the same settings",
                                DatasetError)
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    # Concurrent tasks may race here; they all write the same content atomically.
    write_dataset_json(out_dir, {**settings, **informational, "complete": False})


def _batches(items: Iterable, size: int) -> Iterator[list]:
    items = iter(items)
    while batch := list(islice(items, size)):
        yield batch


class ShardMaker:
    """Encodes the clips of a group of videos into one shard and records its manifest part."""

    def __init__(self, cfg: PreprocessConfig, settings: dict, model, report: Callable[[int], None]):
        self.cfg, self.settings, self.report = cfg, settings, report
        self.device = _device(cfg)
        self.model = model.to(self.device).eval()
        self.root = Path(cfg.input_dir)

    def _clips(self, entries: list[VideoEntry], skipped: list[dict]) -> Iterator[tuple[VideoEntry, dict]]:
        for entry in entries:
            failed: list = []   # iter_clips logs why and lists the video here when it skips it
            for clip in iter_clips([entry], self.cfg.clip, failed):
                yield entry, clip
            if failed:
                skipped.append({"video_id": entry.video_id, "source": _source(entry, self.root), "why": failed[0].why})

    def _encode(self, batch: list[dict]):
        video = torch.stack([clip["video"] for clip in batch]).to(self.device)
        with torch.no_grad():
            codes = self.model.encode(video).cpu().numpy()
        if list(codes.shape[1:]) != self.settings["grid"]:
            raise PreprocessError(f"the tokenizer produced code grids {list(codes.shape[1:])}, expected "
                                  f"{self.settings['grid']}; check its downsampling configuration")
        return codes

    def _encoded(self, entries: list[VideoEntry], skipped: list[dict]) -> Iterator[tuple[np.ndarray, dict]]:
        """(codes, meta) of every clip of ``entries``, encoded a batch at a time."""
        for batch in _batches(self._clips(entries, skipped), self.cfg.batch_size):
            for (entry, clip), codes in zip(batch, self._encode([clip for _, clip in batch])):
                yield codes, {"video_id": entry.video_id, "split": self.cfg.split, "start": int(clip["start"]),
                              "stride": int(clip["stride"]), "fps": float(clip["fps"]),
                              "source": _source(entry, self.root)}
            self.report(len(batch))

    def make(self, index: int, entries: list[VideoEntry]) -> dict:
        name = shard_name(self.cfg.prefix, index)
        skipped: list[dict] = []
        clips = write_code_shard(Path(self.cfg.out_dir), name, self._encoded(entries, skipped),
                                 self.settings["grid"], skipped)
        return {"shard": name, "clips": clips, "skipped_videos": len(skipped)}


def write_code_shard(out_dir: Path, name: str, items: Iterable[tuple[np.ndarray, dict]], grid,
                     skipped: Iterable[dict] = ()) -> int:
    """Shard ``name`` from (codes [T', H', W'], meta) pairs, then its manifest part; returns the clip count.

    Temporary files a killed run left for this shard are removed first; ``skipped`` (videos left out) is
    read after ``items`` is exhausted, so a generator may fill it.
    """
    _remove_leftovers(out_dir, name)
    rows = []
    t, h, w = grid
    with ShardWriter(out_dir / name) as writer:
        for codes, meta in items:
            key = f"{Path(name).stem}-{writer.count:06d}"
            rows.append({"shard": name, "key": key, "index": writer.count, **meta,
                         "grid_t": t, "grid_h": h, "grid_w": w})
            writer.write(key, codes, meta)
    write_part(out_dir, name, rows, list(skipped))
    return len(rows)


# A pool worker's ShardMaker, built once per process by ``_init_worker`` (the tokenizer is loaded once).
_MAKER: ShardMaker | None = None


def _init_worker(cfg: PreprocessConfig, settings: dict, progress, threads: int) -> None:
    global _MAKER
    ensure_logging()   # a spawned process: the parent's level comes with the environment
    torch.set_num_threads(threads)
    _MAKER = ShardMaker(cfg, settings, load_tokenizer(cfg.tokenizer), progress.put)


def _make_in_worker(job: tuple[int, list[VideoEntry]]) -> dict:
    return _MAKER.make(*job)


def _drain(progress, bar: tqdm) -> None:
    while True:
        try:
            bar.update(progress.get_nowait())
        except queue.Empty:
            return


def _run_pool(cfg: PreprocessConfig, settings: dict, jobs: list, bar: tqdm) -> list[dict]:
    """Make the shards ``jobs`` in ``cfg.workers`` spawned processes, one whole shard per call."""
    ctx = mp.get_context("spawn")   # forking a process that has loaded torch is unsafe (threads, CUDA)
    progress = ctx.Queue()
    # Split the cores this process may use (a SLURM allocation, not the whole node) between the workers.
    threads = max(1, len(os.sched_getaffinity(0)) // cfg.workers)
    # ProcessPoolExecutor, unlike multiprocessing.Pool, fails instead of hanging when a worker dies.
    with ProcessPoolExecutor(min(cfg.workers, len(jobs)), mp_context=ctx, initializer=_init_worker,
                             initargs=(cfg, settings, progress, threads)) as pool:
        futures = [pool.submit(_make_in_worker, job) for job in jobs]
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
            _drain(progress, bar)
            errors = [f.exception() for f in done if f.exception()]
            if errors:
                pool.shutdown(cancel_futures=True)   # the first error stops the run; finished shards stay
                raise errors[0]
    _drain(progress, bar)
    return [f.result() for f in futures]


def _remove_leftovers(out_dir: Path, shard: str) -> None:
    """Temporary files of a killed run; only for shards this task is about to redo (others may be in flight)."""
    part = part_path(out_dir, shard)
    for leftover in [*leftovers(out_dir / shard), *leftovers(part)]:
        leftover.unlink(missing_ok=True)


def preprocess(cfg: PreprocessConfig) -> dict:
    """Make this task's unfinished shards; merge the manifest when every shard is finished.

    Returns counts for this run (shards written / already finished, clips, skipped videos, listed videos
    missing), its seconds and clips/s, and ``merged``: the dataset counts when the manifest was merged, else
    None. The merge refuses a dataset of 0 clips (DatasetError naming the input, the split and why).
    """
    start_time = time.perf_counter()
    if not Path(cfg.input_dir).is_dir():
        raise PreprocessError(f"input dir '{cfg.input_dir}' does not exist")
    model = load_tokenizer(cfg.tokenizer)
    job_plan = plan(cfg, model)
    out_dir = Path(cfg.out_dir)
    num_shards = job_plan.settings["num_shards"]
    prepare_out_dir(out_dir, job_plan.settings,
                    {"tokenizer": str(Path(cfg.tokenizer).resolve()), "input_dir": str(Path(cfg.input_dir).resolve()),
                     "missing_videos": job_plan.missing})
    mine = [i for i in range(num_shards) if i % cfg.num_tasks == cfg.task_index]
    done = finished_shards(out_dir, [shard_name(cfg.prefix, i) for i in mine])
    per = cfg.videos_per_shard
    jobs = [(i, job_plan.entries[i * per:(i + 1) * per]) for i in mine if shard_name(cfg.prefix, i) not in done]
    log.info(f"task {cfg.task_index}/{cfg.num_tasks}: {len(jobs)} of its {len(mine)} shards to make ({len(done)} "
             f"finished before), {job_plan.settings['num_videos']} videos in {num_shards} shards in all -> {out_dir}")
    with tqdm(desc=f"task {cfg.task_index}/{cfg.num_tasks}: {len(jobs)} shards", unit="clip",
              disable=not cfg.progress) as bar:
        if cfg.workers > 1 and len(jobs) > 1:
            del model   # the workers load their own copies
            results = _run_pool(cfg, job_plan.settings, jobs, bar)
        else:
            maker = ShardMaker(cfg, job_plan.settings, model, bar.update)
            results = [maker.make(*job) for job in jobs]
    all_shards = [shard_name(cfg.prefix, i) for i in range(num_shards)]
    merged = merge_manifest(out_dir) if len(finished_shards(out_dir, all_shards)) == len(all_shards) else None
    if merged is not None:
        log.info(f"every shard is finished: merged the manifest of {out_dir}")
    seconds = time.perf_counter() - start_time
    clips = sum(r["clips"] for r in results)
    return {"task_index": cfg.task_index, "num_tasks": cfg.num_tasks, "shards_total": num_shards,
            "shards_written": len(results), "shards_already_done": len(done), "clips": clips,
            "skipped_videos": sum(r["skipped_videos"] for r in results), "missing_videos": len(job_plan.missing),
            "seconds": seconds, "clips_per_s": clips / seconds if seconds > 0 else 0.0, "merged": merged}
