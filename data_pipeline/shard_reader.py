"""Reading one shard of codes fast: a numpy tar parser over a memory map (or fetched bytes), checked
against the manifest, with the layout of a checked shard reusable while the file is unchanged.

Why not webdataset or tarfile here: see ``data_pipeline.loader``. ``read_clips`` maps a local file;
``clips_from_bytes`` takes a shard fetched from a URL. Both raise ``_Corrupt`` with the reason, which the
loader turns into an error or a counted skip.
"""
from __future__ import annotations

import hashlib
import io
import mmap
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipeline.shard_format import CODES_EXT


class _Corrupt(Exception):
    """Why a shard's bytes are unusable; turned into an error or a warning by the caller."""


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
               vocab: int | None, layouts: dict | None = None, hash_once: bool = False) -> np.ndarray:
    """Every clip of one shard as one block [n, T', H', W'] in tar order; raises ``_Corrupt`` with the reason.

    ``members`` and ``shapes`` are the codes member names (bytes) and [T', H', W'] of the shard's samples in
    tar order, from the manifest; the shard must agree with both. Clips shorter than the longest are
    zero-padded at the end.

    The file is memory-mapped, and when its clips are evenly spaced (the usual case: equal codes and
    metadata members) the block returned is a strided view of the mapping, read straight from the page
    cache with no copy; otherwise the clips are copied out. ``layouts`` (path -> checked layout) lets a
    loader that reads the shard again (next epoch) skip the tar parse and the checks: an entry is reused
    only while the file's size, mtime, inode and device are those it was checked with. ``sha256`` is
    verified on every read, or with ``hash_once`` only on the read that checks the layout: the cached
    entry is then also the verdict that these bytes (same size, mtime, inode) hashed right.
    """
    try:
        with open(path, "rb") as f:
            stat = os.fstat(f.fileno())
            if stat.st_size != size or not size:
                raise _Corrupt(f"{stat.st_size} bytes, shards.parquet says {size} (truncated or rewritten)")
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise _Corrupt(f"unreadable ({e.strerror})") from None
    identity = (stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_dev)
    cached = layouts.get(path) if layouts is not None else None
    checked = cached is not None and cached[0] == identity
    if sha256 is not None and not (checked and hash_once) and hashlib.sha256(buf).hexdigest() != sha256:
        raise _Corrupt("sha256 differs from shards.parquet")
    if checked:
        return _clips(buf, cached[1], shapes)
    layout = _find_layout(buf, members, shapes)
    clips = _check_range(_clips(buf, layout, shapes), vocab)
    if layouts is not None:
        layouts[path] = (identity, layout)
    return clips


def clips_from_bytes(buf: bytes, *, size: int, sha256: str | None, members: np.ndarray, shapes: np.ndarray,
                     vocab: int | None) -> np.ndarray:
    """``read_clips`` for a shard fetched into memory (a URL): the same checks; the layout is not reused,
    since the next epoch fetches the bytes again."""
    if len(buf) != size or not size:
        raise _Corrupt(f"{len(buf)} bytes, shards.parquet says {size} (truncated or rewritten)")
    if sha256 is not None and hashlib.sha256(buf).hexdigest() != sha256:
        raise _Corrupt("sha256 differs from shards.parquet")
    return _check_range(_clips(buf, _find_layout(buf, members, shapes), shapes), vocab)


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


