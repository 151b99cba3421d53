"""Streaming, exactly resumable loader over a preprocessed dataset directory (tar shards + Parquet manifest).

``make_loader(cfg, rank, world_size, expect_grid, expect_vocab)`` returns a ``ShardLoader``:

- ``for batch in loader`` runs the rest of the current epoch; epochs advance by themselves (after the last
  batch of epoch e the loader is at epoch e+1, position 0). Leaving the loop early keeps the position:
  the next ``iter`` goes on from there. ``set_epoch(e)`` jumps to the start of epoch e and is a no-op for
  the current epoch, so a trainer that calls it every epoch does not undo a resume.
- ``batches_per_epoch`` (also ``len``) is the same on every rank; the balancing rule is in ``loader_state``.
- ``state_dict()`` is a small JSON-serializable dict (epoch, batches consumed, the plan settings, the
  per-rank stream seeds, corrupt shards seen); ``load_state_dict()`` on a loader made with the same
  settings yields exactly the batches an uninterrupted run would have yielded next.
- A batch is a dict: ``codes`` int64 [B, L, H', W'] (L = ``crop_frames`` or the clips' T'); per sample
  ``key``, ``video_id``, ``split``, ``source`` (lists), ``start``, ``stride``, ``fps``, ``frame_offset``
  (first latent frame of the crop) and ``pad`` (True where the slot repeats a sample to fill the epoch
  or stands in for a corrupt one) as tensors; ``epoch`` and ``batch_index`` (position in the epoch).

Clips may differ in T' (a length curriculum's dataset): set ``crop_frames`` to at most the shortest clip
and every sample is cropped to that many latent frames at an offset drawn from its stream's seed.

Reading: metadata comes from ``manifest.parquet`` (no per-sample JSON), and a shard is read whole and
parsed with numpy (``tar_members``), not through webdataset or tarfile. Webdataset's pipeline keeps its
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

Corrupt shards (size or sha256 differing from shards.parquet, a broken tar, keys that differ from the
manifest, malformed arrays, codes outside the codebook) raise ``CorruptShardError`` with
``on_corrupt: fail``. With ``skip`` each one is reported once per loader as a ``CorruptShardWarning``
with a running count, and each of its samples is replaced by the sample at the same position (modulo
size) of the next readable shard in the epoch's shard order, flagged ``pad``: batch shapes and counts
never change, and the choice depends only on the files, so it resumes exactly. Reading never blocks on
bad data: a worker reports the error as a batch and the main process raises it.
"""
from __future__ import annotations

import hashlib
import io
import mmap
import os
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.loader_state import (
    DatasetIndex,
    EpochPlan,
    StreamPlan,
    check_state,
    consumed_batches,
    make_state,
    stream_of_worker,
)
from data_pipeline.manifest import DatasetError
from data_pipeline.shard_format import CODES_EXT
from mebt.errors import ConfigError


class CorruptShardError(DatasetError):
    """A shard that cannot be read (with ``on_corrupt: fail``)."""


class CorruptShardWarning(UserWarning):
    """A corrupt shard skipped with ``on_corrupt: skip``."""


class _Corrupt(Exception):
    """Why a shard's bytes are unusable; turned into an error or a warning by the caller."""


@dataclass
class LoaderConfig:
    data_dir: str = ""
    split: str | None = None            # keep only manifest rows of this split (None: every row)
    batch_size: int = 32
    shuffle: bool = True                # shard order per epoch and the sample shuffle buffer
    shuffle_buffer: int = 1000          # samples; larger mixes more shards, holds more clips in memory
    seed: int = 0
    num_workers: int = 0                # DataLoader worker processes per rank; 0 reads in the main process
    prefetch_factor: int = 2            # batches each worker keeps ready
    on_corrupt: Literal["skip", "fail"] = "skip"
    verify: Literal["size", "sha256"] = "size"   # sha256 also catches flipped bits, ~2 us per 4 KiB clip
    drop_last: bool = True              # True: drop the epoch's remainder; False: pad it by wrapping around
    crop_frames: int | None = None      # yield this many latent frames at a seeded random offset
    pin_memory: bool = False

    def __post_init__(self):
        if not self.data_dir:
            raise ConfigError("config key 'data_dir' is empty; set it to a directory made by mebt preprocess")
        for key in ("batch_size", "shuffle_buffer", "prefetch_factor"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key '{key}' must be >= 1, got {getattr(self, key)}")
        for key in ("seed", "num_workers"):
            if getattr(self, key) < 0:
                raise ConfigError(f"config key '{key}' must be >= 0, got {getattr(self, key)}")
        if self.crop_frames is not None and self.crop_frames < 1:
            raise ConfigError(f"config key 'crop_frames' must be >= 1 or null, got {self.crop_frames}")


# --- reading one shard -------------------------------------------------------------------------------

_BLOCK = 512


def _blocks(buf: bytes) -> np.ndarray:
    return np.frombuffer(buf, dtype=np.uint8, count=len(buf) // _BLOCK * _BLOCK).reshape(-1, _BLOCK)


def _octal(fields: np.ndarray) -> np.ndarray:
    """Values of fixed-width octal fields [n, width] (garbage where a byte is not a digit: check separately)."""
    value = np.zeros(len(fields), dtype=np.int64)
    for column in fields.T:
        value = value * 8 + column - ord("0")
    return value


def tar_members(buf: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(names as bytes, data offsets, sizes) of every regular file of a tar image, in archive order.

    Parsed with numpy in a few vector operations (tarfile spends ~15 us a member in Python): the blocks
    that carry the ustar magic are taken as headers, and accepted only if their sizes (all octal digits)
    chain them exactly from the first block to the end-of-archive block, every one is a regular file and
    none has a name prefix. Anything else (pax or GNU long names, other layouts, a data block that looks
    like a header, damage) goes through tarfile, which reads the other layouts and rejects the damage.
    Header checksums are not summed (that would double the cost): the fields used here, names and
    sizes, are checked against the manifest and the chain, and the others do not matter to the loader.
    """
    blocks = _blocks(buf)
    at = np.flatnonzero(blocks[:, 257] == ord("u"))
    at = at[(blocks[at, 257:262] == np.frombuffer(b"ustar", np.uint8)).all(axis=1)]
    # Only the fields used are gathered: copying whole header blocks would double the cost.
    size_digits = blocks[at, 124:135]   # tarfile writes 11 octal digits and a NUL
    sizes = _octal(size_digits)
    following = at + 1 + -(-sizes // _BLOCK)
    chained = len(at) > 0 and at[0] == 0 and np.array_equal(at[1:], following[:-1]) \
        and following[-1] < len(blocks) and not blocks[following[-1]].any()
    if not (chained and ((size_digits >= ord("0")) & (size_digits < ord("8"))).all()
            and np.isin(blocks[at, 156], (0, ord("0"))).all() and not blocks[at, 345].any()):
        return _tarfile_members(buf)
    return blocks[at, :100].view("S100").ravel(), (at + 1) * _BLOCK, sizes


def _tarfile_members(buf: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        with tarfile.open(fileobj=io.BytesIO(buf), mode="r:") as tar:
            members = [m for m in tar if m.isfile()]
    except (tarfile.TarError, EOFError) as e:
        raise _Corrupt(f"unreadable tar ({e})") from None
    return (np.array([m.name.encode() for m in members], dtype="S"),
            np.array([m.offset_data for m in members], dtype=np.int64),
            np.array([m.size for m in members], dtype=np.int64))


def _npy_header(buf: bytes, offset: int, size: int) -> tuple[int, np.dtype, tuple]:
    """(header length, dtype, shape) of the .npy member at ``offset``, which must hold a C-order integer grid."""
    stream = io.BytesIO(buf[offset:offset + min(size, 4096)])
    try:
        version = np.lib.format.read_magic(stream)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(stream)
    except ValueError as e:
        raise _Corrupt(f"unreadable .npy header ({e})") from None
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if dtype.kind not in "iu" or fortran or len(shape) != 3 or stream.tell() + nbytes != size:
        raise _Corrupt(f"codes are not a C-order integer [T', H', W'] array filling their member ({dtype}, {shape})")
    return stream.tell(), dtype, shape


@dataclass(frozen=True)
class _Layout:
    """Where a shard's clips lie, found and checked by one full read; reused while the file is unchanged."""
    offsets: np.ndarray     # data offset (after the tar header) of each codes member, in tar order
    sizes: np.ndarray
    header_len: int         # .npy header length when every clip shares one header and shape, else 0
    dtype: np.dtype | None
    shape: tuple | None


def read_clips(path: Path, *, size: int, sha256: str | None, members: np.ndarray, shapes: np.ndarray,
               vocab: int | None, layouts: dict | None = None) -> np.ndarray:
    """Every clip of one shard as one block [n, T', H', W'] in tar order; raises ``_Corrupt`` with the reason.

    ``members`` and ``shapes`` are the codes member names (bytes) and [T', H', W'] of the shard's samples in
    tar order, from the manifest; the shard must agree with both. Clips shorter than the longest are
    zero-padded at the end.

    The file is memory-mapped, and when its clips are evenly spaced (the usual case: equal codes and
    metadata members) the block returned is a strided view of the mapping, read straight from the page
    cache with no copy; otherwise the clips are copied out. ``layouts`` (path -> checked layout) lets a
    loader that reads the shard again (next epoch) skip the tar parse and the checks: an entry is reused
    only while the file's size, mtime, inode and device are those it was checked with; ``sha256`` is
    verified on every read.
    """
    try:
        with open(path, "rb") as f:
            stat = os.fstat(f.fileno())
            if stat.st_size != size or not size:
                raise _Corrupt(f"{stat.st_size} bytes, shards.parquet says {size} (truncated or rewritten)")
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise _Corrupt(f"unreadable ({e.strerror})") from None
    if sha256 is not None and hashlib.sha256(buf).hexdigest() != sha256:
        raise _Corrupt("sha256 differs from shards.parquet")
    identity = (stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_dev)
    cached = layouts.get(path) if layouts is not None else None
    if cached is not None and cached[0] == identity:
        return _clips(buf, cached[1], shapes)
    layout = _find_layout(buf, members, shapes)
    clips = _check_range(_clips(buf, layout, shapes), vocab)
    if layouts is not None:
        layouts[path] = (identity, layout)
    return clips


def _find_layout(buf, members: np.ndarray, shapes: np.ndarray) -> _Layout:
    names, offsets, sizes = tar_members(buf)
    is_codes = np.char.endswith(names, f".{CODES_EXT}".encode())
    found = names[is_codes]
    common = min(len(found), len(members))
    differ = np.flatnonzero(found[:common] != members[:common])
    if len(found) != len(members) or len(differ):
        first = int(differ[0]) if len(differ) else common
        raise _Corrupt(f"holds {len(found)} samples, the manifest lists {len(members)}; they differ from "
                       f"sample {first} on")
    offsets, sizes = offsets[is_codes], sizes[is_codes]
    header_len, dtype, shape = _npy_header(buf, int(offsets[0]), int(sizes[0]))
    blocks = _blocks(buf)
    first = offsets // _BLOCK   # members start on block boundaries
    if (header_len <= _BLOCK and (sizes == sizes[0]).all()
            and (blocks[first, :header_len] == blocks[first[0], :header_len]).all()):
        if not (shapes == shape).all():
            raise _Corrupt(f"clips are {list(shape)}, the manifest says otherwise")
        return _Layout(offsets, sizes, header_len, dtype, tuple(shape))
    for off, n, expected_shape in zip(offsets.tolist(), sizes.tolist(), shapes.tolist()):
        if list(_npy_header(buf, off, n)[2]) != expected_shape:
            raise _Corrupt(f"a clip is {list(_npy_header(buf, off, n)[2])}, the manifest says {expected_shape}")
    return _Layout(offsets, sizes, 0, None, None)


def _clips(buf, layout: _Layout, shapes: np.ndarray) -> np.ndarray:
    offsets = layout.offsets
    if layout.header_len:
        count = int(np.prod(layout.shape))
        step = np.unique(np.diff(offsets))
        if len(step) <= 1:
            # Evenly spaced: a view of the mapping (the array keeps the mmap alive; nothing is copied).
            return np.ndarray((len(offsets), count), dtype=layout.dtype, buffer=buf,
                              offset=int(offsets[0]) + layout.header_len,
                              strides=(int(step[0]) if len(step) else 0, layout.dtype.itemsize)
                              ).reshape(len(offsets), *layout.shape)
        blocks = _blocks(buf)
        span = -(-int(layout.sizes[0]) // _BLOCK)
        data = blocks[(offsets // _BLOCK)[:, None] + np.arange(span)].reshape(len(offsets), span * _BLOCK)
        return data[:, layout.header_len:int(layout.sizes[0])].view(layout.dtype).reshape(len(offsets), *layout.shape)
    clips = np.zeros((len(offsets), *shapes.max(axis=0)), dtype=np.int64)
    for clip, off, n in zip(clips, offsets.tolist(), layout.sizes.tolist()):
        header_len, dtype, shape = _npy_header(buf, off, n)
        clip[:shape[0]] = np.frombuffer(buf, dtype=dtype, count=int(np.prod(shape)), offset=off + header_len
                                        ).reshape(shape)
    return clips


def _check_range(codes: np.ndarray, vocab: int | None) -> np.ndarray:
    # An out-of-range code would fail much later as an embedding index error on the accelerator.
    if not codes.size:
        return codes
    if vocab is not None and codes.dtype.kind == "i" and vocab <= np.iinfo(codes.dtype).max + 1:
        # One pass instead of min and max: seen as unsigned, negative codes are >= 2^(bits-1) >= vocab.
        valid = codes.view(codes.dtype.str.replace("i", "u")).max() < vocab
    else:
        valid = codes.min() >= 0 and (vocab is None or codes.max() < vocab)
    if not valid:
        raise _Corrupt(f"codes span [{codes.min()}, {codes.max()}], outside the codebook [0, {vocab})")
    return codes


# --- one worker stream ---------------------------------------------------------------------------------

class _StreamReader:
    """Builds one stream's batches from its plan, reading each shard when a batch first needs it.

    A shard's block stays in memory until the last of its samples in the plan has been yielded, so memory
    follows the shuffle buffer (the shards with samples still in it), not the whole stream.
    """

    def __init__(self, index: DatasetIndex, cfg: LoaderConfig, plan: StreamPlan, grid: tuple, first: int,
                 layouts: dict):
        self.index, self.cfg, self.plan, self.grid, self.layouts = index, cfg, plan, grid, layouts
        self.num_batches = len(plan.rows) // cfg.batch_size
        shards, uses = np.unique(index.row_shard[plan.rows[first * cfg.batch_size:]], return_counts=True)
        self.uses = dict(zip(shards.tolist(), uses.tolist()))   # samples of each shard still to yield
        self.blocks: dict[int, np.ndarray | None] = {}          # None: the shard is corrupt
        self.corrupt: list[tuple[str, str]] = []   # found since the last batch, reported with the next one

    def _load(self, shard: int) -> None:
        index, name = self.index, self.index.shard_names[shard]
        members, shapes = index.shard_samples(shard)
        try:
            self.blocks[shard] = read_clips(index.data_dir / name, size=int(index.shard_bytes[shard]),
                                            sha256=index.shard_sha256[shard] if self.cfg.verify == "sha256" else None,
                                            members=members, shapes=shapes, vocab=index.codebook_size,
                                            layouts=self.layouts)
        except _Corrupt as e:
            if self.cfg.on_corrupt == "fail":
                raise CorruptShardError(f"shard '{index.data_dir / name}' is corrupt: {e} (set on_corrupt: skip to "
                                        "skip it)") from None
            self.blocks[shard] = None
            self.corrupt.append((name, str(e)))

    def _block(self, shard: int) -> np.ndarray | None:
        if shard not in self.blocks:
            self._load(shard)
        return self.blocks[shard]

    def _stand_in(self, row: int, offset: int) -> tuple[int, int]:
        """(row, offset) standing in for a sample of a corrupt shard: the sample at the same tar position
        (modulo its size) of the next readable shard in the epoch's shard order.

        It depends only on the plan and the files, so a resumed run picks the same one.
        """
        shard = self.index.row_shard[row]
        order = self.plan.shard_order
        layout = self.index.layout
        for other in np.roll(order, -int(np.flatnonzero(order == shard)[0]))[1:].tolist():
            if layout.shard_count[other] and self._block(other) is not None:
                position = self.index.row_index[row] % layout.shard_count[other]
                stand_in = int(layout.rows[layout.shard_start[other] + position])
                if self.cfg.crop_frames is not None:
                    offset = min(offset, int(self.index.frames[stand_in]) - self.cfg.crop_frames)
                return stand_in, offset
        raise CorruptShardError(f"every shard of '{self.index.data_dir}' is corrupt; nothing can stand in for them")

    def _gather(self, rows: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """int64 [B, L, H', W'] codes: one fancy-indexing copy per shard in the batch."""
        shards, positions = self.index.row_shard[rows], self.index.row_index[rows]
        codes = np.empty((len(rows), *self.grid), dtype=np.int64)
        for shard in np.unique(shards).tolist():
            sel = np.flatnonzero(shards == shard)
            if self.cfg.crop_frames is None:
                codes[sel] = self.blocks[shard][positions[sel]]
            else:
                frames = offsets[sel, None] + np.arange(self.cfg.crop_frames)
                codes[sel] = self.blocks[shard][positions[sel, None], frames]
        return codes

    def batch(self, j: int) -> dict:
        s = slice(j * self.cfg.batch_size, (j + 1) * self.cfg.batch_size)
        rows, offsets, pad = self.plan.rows[s].copy(), self.plan.frame_offsets[s].copy(), self.plan.pad[s].copy()
        shards = self.index.row_shard[rows]
        in_batch, used = np.unique(shards, return_counts=True)   # before stand-ins replace corrupt rows
        corrupt = [shard for shard in in_batch.tolist() if self._block(shard) is None]
        if corrupt:
            bad = np.flatnonzero(np.isin(shards, corrupt))
            for i in bad.tolist():
                rows[i], offsets[i] = self._stand_in(int(rows[i]), int(offsets[i]))
            pad[bad] = True
        codes = self._gather(rows, offsets)
        for shard, n in zip(in_batch.tolist(), used.tolist()):
            self.uses[shard] -= n
            if not self.uses[shard]:
                del self.blocks[shard]
        found, self.corrupt = self.corrupt, []
        return {"codes": torch.from_numpy(codes), **self.index.metadata(rows),
                "frame_offset": torch.from_numpy(offsets), "pad": torch.from_numpy(pad), "corrupt_shards": found}


class _EpochStreams(IterableDataset):
    """The rest of one epoch on one rank: each DataLoader worker (or the main process) serves one stream."""

    def __init__(self, index: DatasetIndex, cfg: LoaderConfig, plan: EpochPlan, grid: tuple, rank: int,
                 epoch: int, position: int, layouts: dict):
        self.index, self.cfg, self.plan, self.grid, self.layouts = index, cfg, plan, grid, layouts
        self.rank, self.epoch, self.position = rank, epoch, position

    def __iter__(self):
        info = get_worker_info()
        num_streams = self.plan.num_streams
        stream = stream_of_worker(self.position, info.id if info else 0, num_streams)
        first = consumed_batches(self.position, stream, num_streams)
        try:
            reader = _StreamReader(self.index, self.cfg, self.plan.stream(self.index.layout, self.rank, stream,
                                                                          self.epoch), self.grid, first,
                                    self.layouts)
            for j in range(first, reader.num_batches):
                yield {**reader.batch(j), "epoch": self.epoch, "batch_index": j * num_streams + stream}
        except CorruptShardError as e:
            # Sent as data so the main process raises it as one clean line instead of a worker traceback.
            yield {"error": str(e)}


def _as_is(batch: dict) -> dict:
    # Batches are made whole by the streams; the DataLoader's default would revisit every metadata string.
    return batch


class ShardLoader:
    """One rank's view of a dataset: iterate for the rest of the epoch; see the module docstring."""

    def __init__(self, cfg: LoaderConfig, index: DatasetIndex, grid: tuple, rank: int, world_size: int):
        self.cfg, self.index, self.grid, self.rank = cfg, index, grid, rank
        self.plan = EpochPlan(dataset=index.fingerprint, num_samples=len(index.layout.rows), world_size=world_size,
                              num_streams=max(1, cfg.num_workers), batch_size=cfg.batch_size,
                              drop_last=cfg.drop_last, shuffle=cfg.shuffle, shuffle_buffer=cfg.shuffle_buffer,
                              seed=cfg.seed, crop_frames=cfg.crop_frames)
        self.batches_per_epoch = self.plan.batches_per_rank
        if self.batches_per_epoch == 0:
            raise ConfigError(f"dataset '{index.data_dir}' has {self.plan.num_samples} clips, fewer than one batch per "
                              f"rank ({world_size} rank(s) x data.batch_size {cfg.batch_size}); set data.batch_size to "
                              f"at most {max(1, self.plan.num_samples // world_size)} or data.drop_last=false")
        self.epoch = 0
        self.position = 0
        self.corrupt_shards: dict[str, str] = {}
        # Checked shard layouts, reused by later epochs read in this process (workers start afresh).
        self.layouts: dict = {}

    def __len__(self) -> int:
        return self.batches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict:
        return make_state(self.plan, self.rank, self.epoch, self.position, list(self.corrupt_shards))

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = check_state(state, self.plan, self.rank)
        self.corrupt_shards.update(dict.fromkeys(state.get("corrupt_shards", []), "seen before the resume"))

    def __iter__(self):
        streams = _EpochStreams(self.index, self.cfg, self.plan, self.grid, self.rank, self.epoch, self.position,
                               self.layouts)
        # Workers are started per epoch (not persistent) so that each one gets this epoch and position.
        batches = DataLoader(streams, batch_size=None, collate_fn=_as_is, num_workers=self.cfg.num_workers,
                             in_order=True, prefetch_factor=self.cfg.prefetch_factor if self.cfg.num_workers else None,
                             pin_memory=self.cfg.pin_memory)
        for batch in batches:
            if "error" in batch:
                raise CorruptShardError(batch["error"])
            self._note_corrupt(batch.pop("corrupt_shards"))
            if (batch["epoch"], batch["batch_index"]) != (self.epoch, self.position):
                raise RuntimeError(f"loader got batch {batch['batch_index']} of epoch {batch['epoch']}, expected "
                                   f"{self.position} of {self.epoch}: the DataLoader reordered its workers")
            self.position += 1
            if self.position == self.batches_per_epoch:
                self.epoch, self.position = self.epoch + 1, 0
            yield batch

    def _note_corrupt(self, found: list[tuple[str, str]]) -> None:
        for name, reason in found:
            if name not in self.corrupt_shards:
                self.corrupt_shards[name] = reason
                warnings.warn(f"skipped corrupt shard '{name}': {reason} ({len(self.corrupt_shards)} corrupt "
                              "shard(s) skipped so far; on_corrupt: skip)", CorruptShardWarning, stacklevel=3)


def make_loader(cfg: LoaderConfig, rank: int = 0, world_size: int = 1, expect_grid: Sequence[int] | None = None,
                expect_vocab: int | None = None) -> ShardLoader:
    """The loader of ``rank`` of ``world_size``; checks the dataset against the model's grid and vocabulary."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not in [0, world_size={world_size})")
    index = DatasetIndex(cfg.data_dir, cfg.split)
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
    return ShardLoader(cfg, index, grid, rank, world_size)
