"""Streaming, exactly resumable loader over a preprocessed dataset (tar shards + Parquet manifest) in a
directory or at shard URLs (a WebDataset spec over http(s), pipe: or files; ``data_pipeline.sources``).

``make_loader(cfg, rank, world_size, expect_grid, expect_vocab)`` returns a ``ShardLoader``:

- ``for batch in loader`` runs the rest of the current epoch; epochs advance by themselves (after the last
  batch of epoch e the loader is at epoch e+1, position 0). Leaving the loop early keeps the position:
  the next ``iter`` goes on from there. ``set_epoch(e)`` jumps to the start of epoch e and is a no-op for
  the current epoch, so a trainer that calls it every epoch does not undo a resume.
- With ``num_workers`` > 0 the DataLoader workers start at the first ``iter`` and live as long as the loader
  (they end when it is collected or the process exits): each ``iter`` restarts them at the loader's position,
  dropping what they had made ahead for a loop left early, and later epochs reuse what a worker checked before
  (shard layouts, sha256-once verdicts) instead of starting new processes that check everything again.
- ``batches_per_epoch`` (also ``len``) is the same on every rank; the balancing rule is in ``loader_state``.
- ``state_dict()`` is a small JSON-serializable dict (epoch, batches the consumer took, not those made ahead,
  the plan settings, the stream seeds, corrupt shards seen); ``load_state_dict()`` on a loader made with the
  same settings yields exactly the batches an uninterrupted run would have yielded next. A loader of another
  shape (process count, workers, batch size, ``accum``) with the same samples per step resumes it too: the
  global batches stay those of the saved plan (``data_pipeline.elastic``).
- A batch is a dict: ``codes`` int64 [B, L, H', W'] (L = ``crop_frames`` or the clips' T'); per sample
  ``key``, ``video_id``, ``split``, ``source`` (lists), ``start``, ``stride``, ``fps``, ``frame_offset``
  (first latent frame of the crop), ``sample_id`` (the slot's number, unique in the epoch) and ``pad``
  (True where the slot repeats a sample to fill the epoch or stands in for a corrupt one) as tensors;
  ``epoch`` and ``batch_index`` (position in the epoch).

Clips may differ in T' (a length curriculum's dataset): set ``crop_frames`` to at most the shortest clip
and every sample is cropped to that many latent frames at an offset drawn from its stream's seed.

Reading (``data_pipeline.shard_reader``): metadata comes from ``manifest.parquet`` (no per-sample JSON),
and a shard is read whole and parsed with numpy (``tar_members``), not through webdataset or tarfile
(which read the same files: a test checks webdataset yields the same samples). Webdataset's pipeline keeps its
shard position and shuffle buffer in generator state that can be neither saved nor fast-forwarded
without re-reading every sample before the resume point; and per 1024-code clip it measured ~93 us
(pipeline with decoding), ~39 us (its tar iterator alone) and ~33 us (tarfile) on this project's CPU
machine, where 20,000 clips/s allow 50 us in all. The numpy parser takes ~0.4 us and leaves archives
it does not recognise (pax or GNU long names, other layouts) to tarfile. Shards are memory-mapped and
evenly spaced clips are gathered into batches straight from the mapping; the checked layout of a shard
(member offsets, .npy header) is reused by later epochs in the same process while the file's size, mtime
and inode are unchanged, so a steady-state epoch does no tar parsing (webdataset's indexed "wids" reader
makes the same trade with index files). A shard rewritten in place *while* it is being read is not
supported (the mapping would see the new bytes); mebt's writers always write a new file and rename it.
A shard at a URL is fetched whole into memory (timeout, retries, backoff; see ``sources``) and parsed the
same way; each stream holds at most ``max_shards_in_memory`` of them and fetches the next one its plan
needs in a background thread. The plan is computed from the manifest alone, so rank and worker split,
resume, the corrupt-shard policy and the sha256 check are the same for a directory and for URLs.

Corrupt shards (size or sha256 differing from shards.parquet, a broken tar, keys that differ from the
manifest, malformed arrays, codes outside the codebook) raise ``CorruptShardError`` with
``on_corrupt: fail``. With ``skip`` each one is reported once per loader as a ``CorruptShardWarning``
with a running count, and each of its samples is replaced by the sample at the same position (modulo
size) of the next readable shard in the epoch's shard order, flagged ``pad``: batch shapes and counts
never change, and the choice depends only on the files, so it resumes exactly. A shard URL that still
fails after the retries is corrupt in this sense (fail: one line naming the URL and the last cause).
Reading never blocks on bad data: a worker reports the error as a batch and the main process raises it.
"""
from __future__ import annotations

import dataclasses
import warnings
import weakref
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.elastic import ElasticSteps, check_layout
from data_pipeline.loader_state import (
    SHAPE,
    DatasetIndex,
    EpochPlan,
    check_state,
    consumed_batches,
    make_state,
    stream_of_worker,
)
from data_pipeline.manifest import DatasetError
from data_pipeline.sources import ShardSource
from data_pipeline.stream_reader import CorruptShardError, StreamReader
from mebt.errors import ConfigError


class CorruptShardWarning(UserWarning):
    """A corrupt shard skipped with ``on_corrupt: skip``."""


@dataclass
class LoaderConfig:
    data_dir: str = ""                  # dataset dir, dir URL, or shard spec PREFIX-{000000..000127}.tar
    split: str | None = None            # keep only manifest rows of this split (None: every row)
    batch_size: int = 32
    shuffle: bool = True                # shard order per epoch and the sample shuffle buffer
    shuffle_buffer: int = 1000          # samples; larger mixes more shards, holds more clips in memory
    seed: int = 0
    num_workers: int = 0                # DataLoader worker processes per rank; 0 reads in the main process
    prefetch_factor: int = 2            # batches each worker keeps ready
    on_corrupt: Literal["skip", "fail"] = "skip"
    # sha256-once: hash a shard the first time this process reads it (flipped bits that keep codes in range
    # are caught; later epochs reuse the verdict while the file is unchanged); sha256: on every read
    verify: Literal["size", "sha256-once", "sha256"] = "sha256-once"
    drop_last: bool = True              # True: drop the epoch's remainder; False: pad it by wrapping around
    crop_frames: int | None = None      # yield this many latent frames at a seeded random offset
    pin_memory: bool = False
    # Shards at URLs (http, https, pipe:; see data_pipeline.sources):
    meta_dir: str | None = None         # dir/URL of dataset.json, manifest, shards.parquet; default: by the shards
    timeout_s: float = 60.0             # per request: the whole transfer of one file (or the pipe command's run)
    retries: int = 3                    # more attempts after a failed fetch, waiting retry_backoff_s x 1, 2, 4, ...
    retry_backoff_s: float = 1.0
    max_shards_in_memory: int = 8       # fetched shards each stream (rank or worker) holds, prefetched one included
    cache_dir: str | None = None        # keep fetched shards here, read them from disk later (default: write nothing)

    def source(self) -> ShardSource:
        return ShardSource(self.data_dir, self.meta_dir, timeout_s=self.timeout_s, retries=self.retries,
                           retry_backoff_s=self.retry_backoff_s, cache_dir=self.cache_dir)

    def __post_init__(self):
        if not self.data_dir:
            raise ConfigError("config key 'data_dir' is empty; set it to a directory made by mebt preprocess")
        for key in ("batch_size", "shuffle_buffer", "prefetch_factor"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key '{key}' must be >= 1, got {getattr(self, key)}")
        for key in ("seed", "num_workers", "retries", "retry_backoff_s"):
            if getattr(self, key) < 0:
                raise ConfigError(f"config key '{key}' must be >= 0, got {getattr(self, key)}")
        if self.timeout_s <= 0:
            raise ConfigError(f"config key 'timeout_s' must be > 0, got {self.timeout_s}")
        if self.max_shards_in_memory < 2:
            raise ConfigError(f"config key 'max_shards_in_memory' must be >= 2 (one read, one prefetched), got "
                              f"{self.max_shards_in_memory}")
        if self.crop_frames is not None and self.crop_frames < 1:
            raise ConfigError(f"config key 'crop_frames' must be >= 1 or null, got {self.crop_frames}")


class _EpochFromStart(IterableDataset):
    """The rest of one epoch on one rank from the start ``ShardLoader`` set before its latest ``iter``: each
    DataLoader worker (or the main process) serves one stream of the plan, or after an elastic resume its
    share of the saved plan's steps (``data_pipeline.elastic``).

    The loader's one DataLoader keeps its workers for the loader's life, and each ``iter`` of it restarts
    every worker's iterator here; so the start (epoch, position and the layout of the plan followed) lives
    in shared memory, where the workers read it. A worker's copy of this object, and with it ``layouts``
    (checked shard layouts), lasts across epochs, so later epochs skip the tar parse and checks.
    """

    def __init__(self, index: DatasetIndex, cfg: LoaderConfig, plan: EpochPlan, grid: tuple, rank: int,
                 world_size: int, layouts: dict):
        self.index, self.cfg, self.plan, self.grid, self.layouts = index, cfg, plan, grid, layouts
        self.rank, self.world_size = rank, world_size
        # [epoch, position, *the followed plan's SHAPE]; shared so that running workers see what is set later.
        self.start = torch.zeros(2 + len(SHAPE), dtype=torch.int64).share_memory_()

    def set_start(self, epoch: int, position: int, source: EpochPlan) -> None:
        self.start.copy_(torch.tensor([epoch, position, *(getattr(source, key) for key in SHAPE)]))

    def __iter__(self):
        # Read now, when the DataLoader restarts this worker: the main process wrote it before asking.
        epoch, position, *shape = self.start.tolist()
        source = dataclasses.replace(self.plan, **dict(zip(SHAPE, shape)))
        if source != self.plan:
            return iter(ElasticSteps(self.index, self.cfg, source, self.grid, self.rank, self.world_size,
                                     self.plan.batch_size, self.plan.accum, epoch, position, self.layouts))
        return self._streams(epoch, position)

    def _streams(self, epoch: int, position: int):
        info = get_worker_info()
        num_streams = self.plan.num_streams
        stream = stream_of_worker(position, info.id if info else 0, num_streams)
        first = consumed_batches(position, stream, num_streams)
        try:
            reader = StreamReader(self.index, self.cfg, self.plan.stream(self.index.layout, self.rank, stream, epoch),
                                  self.grid, first, self.layouts)
            try:
                for j in range(first, reader.num_batches):
                    batch_index = j * num_streams + stream
                    yield {**reader.batch(j), "epoch": epoch, "batch_index": batch_index,
                           "sample_id": torch.from_numpy(self.plan.sample_ids(self.rank, batch_index))}
            finally:
                reader.close()
        except CorruptShardError as e:
            # Sent as data so the main process raises it as one clean line instead of a worker traceback.
            yield {"error": str(e)}


def _as_is(batch: dict) -> dict:
    # Batches are made whole by the streams; the DataLoader's default would revisit every metadata string.
    return batch


class ShardLoader:
    """One rank's view of a dataset: iterate for the rest of the epoch; see the module docstring."""

    def __init__(self, cfg: LoaderConfig, index: DatasetIndex, grid: tuple, rank: int, world_size: int,
                 accum: int = 1):
        self.cfg, self.index, self.grid, self.rank, self.world_size = cfg, index, grid, rank, world_size
        self.plan = EpochPlan(dataset=index.fingerprint, num_samples=len(index.layout.rows), world_size=world_size,
                              num_streams=max(1, cfg.num_workers), batch_size=cfg.batch_size,
                              drop_last=cfg.drop_last, shuffle=cfg.shuffle, shuffle_buffer=cfg.shuffle_buffer,
                              seed=cfg.seed, crop_frames=cfg.crop_frames, accum=accum)
        # The plan whose slots this loader follows: its own, or after an elastic resume the saved one.
        self.source = self.plan
        self.batches_per_epoch = self.plan.batches_per_rank
        if self.batches_per_epoch == 0:
            per_step = world_size * accum
            raise ConfigError(f"dataset '{index.data_dir}' has {self.plan.num_samples} clips, fewer than one step's "
                              f"({world_size} rank(s) x {accum} micro-batch(es) x data.batch_size {cfg.batch_size}); "
                              f"set data.batch_size to at most {max(1, self.plan.num_samples // per_step)} or "
                              "data.drop_last=false")
        self.epoch = 0
        self.position = 0        # batches of the source plan every rank has taken in this epoch
        self.micro_in_step = 0   # micro-batches yielded of an unfinished step (elastic only)
        self.corrupt_shards: dict[str, str] = {}
        # Checked shard layouts, reused by later epochs read in this process (each worker keeps its own copy).
        self.layouts: dict = {}
        self._epochs = _EpochFromStart(index, cfg, self.plan, grid, rank, world_size, self.layouts)
        # One DataLoader for the loader's life. Its workers start at the first iter and stay until the loader is
        # collected or the process exits; each later iter restarts them at the position, dropping what they made
        # ahead. It is held in a list that a finalizer empties when the loader is collected: reachable from the
        # finalizer registry, the DataLoader and its queues never lie in a garbage cycle with the loader (say an
        # exception's traceback holding a loop over it), where the queues could be finalized before the workers
        # are told to stop, and collecting the cycle would wait 5 s for each worker.
        workers = cfg.num_workers
        self._items_loader = [DataLoader(self._epochs, batch_size=None, collate_fn=_as_is, num_workers=workers,
                                         persistent_workers=workers > 0, in_order=True,
                                         prefetch_factor=cfg.prefetch_factor if workers else None,
                                         pin_memory=cfg.pin_memory)]
        weakref.finalize(self, self._items_loader.clear)
        self._iteration = 0      # iters begun: an older iterator must not take from the restarted workers

    def __len__(self) -> int:
        return self.batches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    @property
    def elastic(self) -> bool:
        """Resumed from a state of another layout: batches follow the saved plan (``data_pipeline.elastic``)."""
        return self.source != self.plan

    def state_dict(self) -> dict:
        if self.micro_in_step:
            raise RuntimeError("ShardLoader.state_dict() inside an optimizer step: an elastic loader saves its "
                               "position at step boundaries only")
        rank = 0 if self.elastic else self.rank   # any rank's state resumes every rank
        return make_state(self.source, rank, self.epoch, self.position, list(self.corrupt_shards))

    def load_state_dict(self, state: dict) -> None:
        source, epoch, position = check_state(state, self.plan)
        if source != self.plan:
            check_layout(source, self.world_size, self.plan.batch_size, self.plan.accum)
            if position % source.accum:
                raise ConfigError(f"loader state is at batch {position} of its epoch, inside an optimizer step of "
                                  f"{source.accum} batches; it resumes only on its own layout")
        self.source, self.epoch, self.position = source, epoch, position
        self.batches_per_epoch = source.batches_per_rank // source.accum * self.plan.accum
        self.corrupt_shards.update(dict.fromkeys(state.get("corrupt_shards", []), "seen before the resume"))

    def __iter__(self):
        if self.elastic:
            yield from self._elastic_batches()
            return
        for batch in self._items():
            self._note_corrupt(batch.pop("corrupt_shards"))
            if (batch["epoch"], batch["batch_index"]) != (self.epoch, self.position):
                raise RuntimeError(f"loader got batch {batch['batch_index']} of epoch {batch['epoch']}, expected "
                                   f"{self.position} of {self.epoch}: the DataLoader reordered its workers")
            self.position += 1
            if self.position == self.batches_per_epoch:
                self.epoch, self.position = self.epoch + 1, 0
            yield batch

    def _items(self):
        """What the workers (or the main process) make from the position to the end of its epoch; a worker's
        error is raised here as one line."""
        self._iteration += 1
        iteration = self._iteration
        self._epochs.set_start(self.epoch, self.position, self.source)
        for item in self._items_loader[0]:
            if "error" in item:
                raise CorruptShardError(item["error"])
            yield item
            if self._iteration != iteration:
                raise RuntimeError("ShardLoader: another iteration of this loader began since this iterator's last "
                                   "batch, and restarted its workers there; take batches from the newest iterator")

    def _elastic_batches(self):
        for item in self._items():
            self._note_corrupt(item["corrupt_shards"])
            if (item["epoch"], item["step"] * self.source.accum) != (self.epoch, self.position):
                raise RuntimeError(f"loader got step {item['step']} of epoch {item['epoch']}, expected batch "
                                   f"{self.position} of {self.epoch}: the DataLoader reordered its workers")
            for i, batch in enumerate(item["micro"]):
                self.micro_in_step = (i + 1) % len(item["micro"])
                if not self.micro_in_step:   # the step's last micro-batch: the position moves before it is used
                    self.position += self.source.accum
                    if self.position == self.source.batches_per_rank:
                        self.epoch, self.position = self.epoch + 1, 0
                yield batch

    def _note_corrupt(self, found: list[tuple[str, str]]) -> None:
        for name, reason in found:
            if name not in self.corrupt_shards:
                self.corrupt_shards[name] = reason
                warnings.warn(f"skipped corrupt shard '{name}': {reason} ({len(self.corrupt_shards)} corrupt "
                              "shard(s) skipped so far; on_corrupt: skip)", CorruptShardWarning, stacklevel=3)


def make_loader(cfg: LoaderConfig, rank: int = 0, world_size: int = 1, expect_grid: Sequence[int] | None = None,
                expect_vocab: int | None = None, accum: int = 1) -> ShardLoader:
    """The loader of ``rank`` of ``world_size`` taking ``accum`` batches per optimizer step (an epoch is a whole
    number of steps); checks the dataset against the model's grid and vocabulary."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not in [0, world_size={world_size})")
    index = DatasetIndex(cfg.source(), cfg.split)
    grid = index.grid(cfg.crop_frames)
    wrong = []
    if expect_grid is not None and tuple(expect_grid) != grid:
        wrong.append(f"model.latent_shape {list(expect_grid)} (the dataset's clip grid: {list(grid)})")
    if expect_vocab is not None and index.codebook_size != expect_vocab:
        wrong.append(f"model.vocab_size {expect_vocab} (the dataset's codebook: {index.codebook_size})")
    if wrong:
        # Every mismatch in one line: a user fixing them one run at a time is the round trip to avoid.
        raise DatasetError(f"dataset '{index.data_dir}' does not fit the model: {'; '.join(wrong)}; leave these keys "
                           "out of the config (the model takes the dataset's), set them to the dataset's values, "
                           "or use a dataset tokenized for this model")
    return ShardLoader(cfg, index, grid, rank, world_size, accum)
