"""What the loader knows without reading a shard: the dataset's tables, which samples every rank and
worker yields in an epoch, and the loader's resumable state.

A plan is made of manifest row numbers, so every rank and worker computes its own share of an epoch
(and any position in it) from the manifest alone. That is what makes resume exact and cheap: a restored
loader recomputes the same plan and starts at the saved position without replaying earlier batches.

The epoch layout (the balancing rule):

1. The shards are put in a seeded order that changes every epoch (the same order on every rank) and
   their samples, in shard order, form one sequence of N samples.
2. Every rank yields the same number K of batches of ``batch_size`` B, a whole number of optimizer steps
   of ``accum`` A batches (so an epoch ends at a step boundary): with ``drop_last`` K = A * (N // (R*B*A))
   and the last N - R*K*B samples of the sequence (different ones every epoch) are left out; without it
   K = A * ceil(N / (R*B*A)) and the sequence wraps around to its start to fill R*K*B slots (those repeats are
   flagged ``pad``). Equal K on every rank means no collective waits on a rank that ran out of data,
   however the shards divide.
3. Rank r takes slots [r*K*B, (r+1)*K*B). Inside a rank the batches are dealt to S = max(1, num_workers)
   streams the way torch's DataLoader consumes its workers, round-robin: batch i of the rank is batch
   i // S of stream i % S, so stream s holds K // S (+1 if s < K % S) batches, taken as one contiguous
   run of slots. A stream reads only the shards under its slots (a shard can be split between two
   streams), and shuffles them through a seeded buffer of ``shuffle_buffer`` samples, like a streaming
   shuffle buffer but computed on row numbers. Seeds: the shard order from (seed, epoch); each stream's
   buffer order and crop offsets from (its stream seed, epoch), the stream seed from (seed, rank, stream).

Resume: the state holds the epoch and the number n of batches every rank has yielded (the ranks step
together). On restart each stream skips the batches of it among the first n, and DataLoader worker w
serves stream (n + w) % S: the DataLoader asks worker 0 first while the next batch belongs to stream n % S.
A state resumes a loader of another shape (ranks, workers, batch size, accumulation) as long as the
samples per step stay the same: ``data_pipeline.elastic`` keeps the saved plan and deals its global
batches out anew, so the run sees the batches it would have seen without the change.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from data_pipeline.manifest import MANIFEST, SAMPLE_SCHEMA, DatasetError
from data_pipeline.shard_format import CODES_EXT
from data_pipeline.sources import ShardSource
from mebt.config import refuse_changed_settings
from mebt.errors import ConfigError

STATE_VERSION = 1
MANIFEST_COLUMNS = tuple(SAMPLE_SCHEMA.names)
STRING_META = ("key", "video_id", "split", "source")
NUMBER_META = ("start", "stride", "fps")


@dataclass(frozen=True)
class SampleLayout:
    """The manifest rows a loader draws from (already filtered by split), grouped by shard."""
    rows: np.ndarray          # manifest row numbers, shard by shard, in tar order within a shard
    shard_start: np.ndarray   # [num_shards] offset of each shard's first row in ``rows``
    shard_count: np.ndarray   # [num_shards] how many of ``rows`` each shard holds (0 if none)
    frames: np.ndarray        # [manifest rows] T' of every clip, for crop offsets


class DatasetIndex:
    """The manifest and shard tables of a dataset directory, checked once and held as arrays.

    Built in the main process and copied into the workers; strings stay in Arrow buffers rather than
    Python objects so that forked workers do not copy them page by page through reference counting.
    """

    def __init__(self, data_dir: str | Path | ShardSource, split: str | None):
        self.source = data_dir if isinstance(data_dir, ShardSource) else ShardSource(str(data_dir))
        self.data_dir = str(self.source)   # for messages: the directory, URL or shard spec as given
        local = self.source.local_dir
        if local is not None and not local.is_dir():
            raise DatasetError(f"dataset directory '{self.data_dir}' does not exist; set data_dir to the output "
                               "directory of mebt preprocess (or a shard URL spec)")
        info, manifest, shards = self.source.read_tables()
        missing = [c for c in MANIFEST_COLUMNS if c not in manifest.column_names]
        if missing:
            raise DatasetError(f"'{self.source.meta_url(MANIFEST)}' lacks columns {missing}; rerun mebt data merge DIR")
        self.codebook_size = info.get("codebook_size")
        self.shard_names = shards.column("shard").to_pylist()
        self.shard_bytes = shards.column("bytes").to_numpy()
        self.shard_sha256 = shards.column("sha256").to_pylist()
        shard_ids = {name: i for i, name in enumerate(self.shard_names)}
        listed = manifest.column("shard").to_pylist()
        unknown = sorted(set(listed) - shard_ids.keys())
        if unknown:
            raise DatasetError(f"manifest of '{self.data_dir}' lists shard '{unknown[0]}' that shards.parquet does "
                               "not; rerun mebt data merge DIR")
        for name in sorted(set(listed)):   # every shard must be one the spec names; local ones must exist
            path = self.source.local_path(name)
            if path is not None and not path.is_file():
                raise DatasetError(f"shard '{name}' listed in the manifest is missing from '{self.data_dir}'; "
                                   "restore it or rerun mebt preprocess for it")

        self.row_shard = np.fromiter((shard_ids[s] for s in listed), dtype=np.int64, count=len(listed))
        self.row_index = manifest.column("index").to_numpy().astype(np.int64)
        self.frames = manifest.column("grid_t").to_numpy().astype(np.int64)
        self.spatial = (manifest.column("grid_h").to_numpy(), manifest.column("grid_w").to_numpy())
        self.strings = manifest.select(list(STRING_META)).combine_chunks()
        # The tar member name of every row's codes, as one fixed-width bytes array (no Python objects, so
        # forked workers share it): comparing a shard's members against it costs no per-key Python work.
        members = pc.binary_join_element_wise(manifest.column("key"), f".{CODES_EXT}", "").cast(pa.binary())
        self.member_names = np.array(members.to_pylist(), dtype="S")
        self.numbers = {c: manifest.column(c).to_numpy() for c in NUMBER_META}

        # Every row of a shard, in tar order: what its keys must match when it is read.
        self.all_rows, self.all_start, self.all_count = self._group(np.arange(manifest.num_rows),
                                                                    shards.column("num_samples"))
        keep = np.ones(manifest.num_rows, dtype=bool)
        if split is not None:
            keep = pc.fill_null(pc.equal(manifest.column("split"), split), False).to_numpy()
            if not keep.any():
                present = sorted(set(manifest.column("split").to_pylist()))
                raise DatasetError(f"dataset '{self.data_dir}' has no samples of split '{split}' (it has {present})")
        rows, start, count = self._group(np.flatnonzero(keep))
        self.layout = SampleLayout(rows=rows, shard_start=start, shard_count=count, frames=self.frames)
        # Names the samples a loader draws from: the shards, their contents and the split.
        identity = json.dumps([self.shard_names, self.shard_sha256, split]).encode()
        self.fingerprint = hashlib.sha256(identity).hexdigest()[:16]

    def _group(self, rows: np.ndarray, expect_counts=None):
        """``rows`` sorted by (shard, index), with each shard's start and count; checks tar positions."""
        rows = rows[np.lexsort((self.row_index[rows], self.row_shard[rows]))]
        count = np.bincount(self.row_shard[rows], minlength=len(self.shard_names))
        start = np.cumsum(count) - count
        if expect_counts is not None:
            position = np.arange(len(rows)) - start[self.row_shard[rows]]
            if not (np.array_equal(count, expect_counts.to_numpy()) and np.array_equal(self.row_index[rows], position)):
                raise DatasetError(f"manifest and shards.parquet of '{self.data_dir}' disagree on the samples of "
                                   "some shard (counts or tar positions); rerun mebt data merge DIR")
        return rows, start, count

    def shard_samples(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """(codes member names, [T', H', W'] per sample) of every sample of a shard in tar order: what reading
        it must find."""
        rows = self.all_rows[self.all_start[shard]:self.all_start[shard] + self.all_count[shard]]
        shapes = np.stack([self.frames[rows], *(a[rows] for a in self.spatial)], axis=1)
        return self.member_names[rows], shapes

    def grid(self, crop_frames: int | None) -> tuple[int, int, int]:
        """The [L, H', W'] every batch has, or a one-line error why this dataset has none."""
        rows = self.layout.rows
        frames = self.frames[rows]
        h, w = (np.unique(a) for a in self.spatial)   # every clip, as shards are decoded whole
        if len(h) != 1 or len(w) != 1:
            raise DatasetError(f"clips of '{self.data_dir}' differ in H'xW' ({h.tolist()} x {w.tolist()}); "
                               "they cannot be batched together")
        if crop_frames is None:
            if frames.min() != frames.max():
                raise ConfigError(f"clips of '{self.data_dir}' differ in length (T' from {frames.min()} to "
                                  f"{frames.max()}); set crop_frames to at most {frames.min()} to batch them")
            return int(frames[0]), int(h[0]), int(w[0])
        if crop_frames > frames.min():
            raise ConfigError(f"config key 'crop_frames' ({crop_frames}) exceeds the shortest clip of "
                              f"'{self.data_dir}' ({frames.min()} latent frames)")
        return crop_frames, int(h[0]), int(w[0])

    def metadata(self, rows: np.ndarray) -> dict:
        meta = self.strings.take(rows).to_pydict()
        meta.update({c: torch.from_numpy(v[rows]) for c, v in self.numbers.items()})
        return meta


@dataclass(frozen=True)
class StreamPlan:
    """One stream's samples for one epoch, in yield order: batch j is slots [j*B, (j+1)*B)."""
    rows: np.ndarray            # manifest row numbers
    frame_offsets: np.ndarray   # first latent frame of each clip's crop (0 without cropping)
    pad: np.ndarray             # True for slots that repeat a sample to fill the last batches
    shard_order: np.ndarray     # the epoch's shard order (the same on every rank and stream)


@dataclass(frozen=True)
class EpochPlan:
    """Every setting the order of batches depends on; a saved state must match it to resume exactly."""
    dataset: str        # DatasetIndex.fingerprint
    num_samples: int
    world_size: int
    num_streams: int
    batch_size: int
    drop_last: bool
    shuffle: bool
    shuffle_buffer: int
    seed: int
    crop_frames: int | None
    accum: int = 1      # batches per optimizer step: an epoch is a whole number of steps

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step, over every rank and micro-batch."""
        return self.world_size * self.batch_size * self.accum

    @property
    def batches_per_rank(self) -> int:
        if self.drop_last:
            steps = self.num_samples // self.global_batch
        else:
            steps = -(-self.num_samples // self.global_batch)
        return steps * self.accum

    def sample_ids(self, rank: int, batch: int) -> np.ndarray:
        """The epoch-unique numbers of the slots of batch ``batch`` of rank ``rank`` (what seeds per-sample
        randomness, so that it follows the sample whichever process takes it after an elastic resume)."""
        return (batch * self.world_size + rank) * self.batch_size + np.arange(self.batch_size)

    def stream_batches(self, stream: int) -> int:
        k, extra = divmod(self.batches_per_rank, self.num_streams)
        return k + (stream < extra)

    def stream_seed(self, rank: int, stream: int) -> int:
        """A stream's own seed, from which every epoch's buffer order and crop offsets are drawn."""
        return int(np.random.SeedSequence([self.seed, rank, stream]).generate_state(1)[0])

    def shard_order(self, num_shards: int, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(num_shards)
        return np.random.default_rng([self.seed, epoch]).permutation(num_shards)

    def stream(self, layout: SampleLayout, rank: int, stream: int, epoch: int) -> StreamPlan:
        """Stream ``stream`` of rank ``rank`` in epoch ``epoch`` (see the module docstring for the layout)."""
        batches_before = rank * self.batches_per_rank + sum(self.stream_batches(s) for s in range(stream))
        slots = np.arange(self.stream_batches(stream) * self.batch_size) + batches_before * self.batch_size
        pad = slots >= self.num_samples
        position = slots % self.num_samples

        shards = self.shard_order(len(layout.shard_count), epoch)
        counts = layout.shard_count[shards]
        ends = np.cumsum(counts)
        # side="right" skips shards without rows (their end equals the previous one).
        k = np.searchsorted(ends, position, side="right")
        rows = layout.rows[layout.shard_start[shards[k]] + position - (ends[k] - counts[k])]

        rng = np.random.default_rng([self.stream_seed(rank, stream), epoch])
        if self.shuffle:
            order = shuffle_buffer_order(len(rows), self.shuffle_buffer, rng)
            rows, pad = rows[order], pad[order]
        offsets = np.zeros(len(rows), dtype=np.int64)
        if self.crop_frames is not None and len(rows):
            offsets = rng.integers(0, layout.frames[rows] - self.crop_frames + 1)
        return StreamPlan(rows, offsets, pad, shards)


def shuffle_buffer_order(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """The order a streaming shuffle buffer of ``size`` items emits items 0..n-1 in.

    The buffer fills with the first ``size`` items; each later item replaces a uniformly chosen one,
    which is emitted; at the end the rest is emitted in random order. An item therefore leaves at most
    a buffer's worth of positions early, which keeps reads close to sequential.
    """
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    size = min(size, n)
    buffer = list(range(size))
    out = []
    for item, pick in zip(range(size, n), rng.integers(0, size, max(0, n - size)).tolist()):
        out.append(buffer[pick])
        buffer[pick] = item
    out.extend(np.asarray(buffer)[rng.permutation(len(buffer))].tolist())
    return np.asarray(out, dtype=np.int64)


def stream_of_worker(position: int, worker: int, num_streams: int) -> int:
    """The stream a DataLoader worker serves when a rank (re)starts at batch ``position`` of an epoch.

    The DataLoader asks its workers round-robin from worker 0, while the next batch belongs to stream
    ``position % S``; rotating the streams by ``position`` keeps batch order exact after a resume.
    """
    return (position + worker) % num_streams


def consumed_batches(position: int, stream: int, num_streams: int) -> int:
    """How many of stream ``stream``'s batches are among the first ``position`` batches of the rank."""
    return max(0, -(-(position - stream) // num_streams))


def make_state(plan: EpochPlan, rank: int, epoch: int, position: int, corrupt_shards: list[str]) -> dict:
    """A small JSON-serializable state; the stream seeds are stored to catch a changed seed derivation."""
    return {
        "version": STATE_VERSION,
        "epoch": epoch,
        "position": position,
        "rank": rank,
        "plan": dataclasses.asdict(plan),
        "stream_seeds": [plan.stream_seed(rank, s) for s in range(plan.num_streams)],
        "corrupt_shards": sorted(corrupt_shards),
    }


# How a plan's slots are dealt to ranks, streams and micro-batches. The rest of a plan fixes which samples
# form each epoch's global batches; these four may differ on resume (``data_pipeline.elastic``).
SHAPE = ("world_size", "num_streams", "batch_size", "accum")


def check_state(state: dict, plan: EpochPlan) -> tuple[EpochPlan, int, int]:
    """(the plan the state was saved with, epoch, position), or a one-line ConfigError why it cannot resume
    a loader with ``plan`` exactly. Every rank is at the same position (they step together), so any rank's
    state resumes any rank."""
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise ConfigError(f"loader state is not a version-{STATE_VERSION} loader state_dict(); "
                          "pass what ShardLoader.state_dict() returned")
    saved = {"accum": 1, **state.get("plan", {})}   # states of before the accum field had one batch per step
    mine = dataclasses.asdict(plan)
    refuse_changed_settings("cannot resume the data loader exactly, its settings changed",
                            {k: v for k, v in saved.items() if k not in SHAPE},
                            {k: v for k, v in mine.items() if k not in SHAPE},
                            "resume with the same dataset and loader config")
    shape = {k: saved.get(k) for k in SHAPE}
    if not all(isinstance(v, int) and v >= 1 for v in shape.values()):
        raise ConfigError(f"loader state has an invalid layout {shape}; pass what ShardLoader.state_dict() returned")
    source = dataclasses.replace(plan, **shape)
    rank = state.get("rank", 0)
    if state.get("stream_seeds") != [source.stream_seed(rank, s) for s in range(source.num_streams)]:
        raise ConfigError("cannot resume the data loader exactly: its stream seeds were derived differently "
                          "(saved by another version of data_pipeline.loader)")
    epoch, position = state.get("epoch"), state.get("position")
    if not (isinstance(epoch, int) and epoch >= 0 and isinstance(position, int)
            and 0 <= position < source.batches_per_rank):
        raise ConfigError(f"loader state has epoch {epoch!r} and position {position!r}; expected an epoch >= 0 "
                          f"and a position in [0, {source.batches_per_rank})")
    return source, epoch, position
