"""The on-disk format of pre-tokenized video codes: WebDataset tar shards, written atomically.

A dataset directory holds shards ``PREFIX-000000.tar``, ``PREFIX-000001.tar``, ... Each sample is a group
of tar members sharing a key (WebDataset convention: the key is the member name up to the first dot):

- ``KEY.codes.npy``: int16 array [T', H', W'] of codebook indices (``np.save`` format, no pickles);
- ``KEY.json``: UTF-8 JSON metadata (video id, split, start frame, stride, fps, source path, ...).

Shards are written under a temporary name and renamed when complete, so a shard that exists is whole;
Temporary files of an interrupted run (``.NAME.tmp-PID.tar``) are never read and are removed by the rerun.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np

from mebt.fsutil import temporary_name

CODES_EXT = "codes.npy"
META_EXT = "json"
CODES_DTYPE = np.int16   # a 16384-entry codebook fits; halves shard size and read bandwidth vs int32


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def check_key(key: str) -> str:
    """WebDataset splits member names at the first dot, so a sample key must not contain one."""
    if not key or "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} must be non-empty without '.' or '/' (WebDataset groups members by it)")
    return key


def encode_codes(codes: np.ndarray) -> bytes:
    codes = np.asarray(codes)
    if codes.ndim != 3:
        raise ValueError(f"codes must be a [T', H', W'] grid, got shape {list(codes.shape)}")
    if codes.size and (codes.min() < 0 or codes.max() > np.iinfo(CODES_DTYPE).max):
        raise ValueError(f"codes must be in [0, {np.iinfo(CODES_DTYPE).max}], got [{codes.min()}, {codes.max()}]")
    buf = io.BytesIO()
    np.save(buf, codes.astype(CODES_DTYPE, copy=False), allow_pickle=False)
    return buf.getvalue()


def decode_codes(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


class ShardWriter:
    """Writes one tar shard to ``path`` via a temporary file; ``close()`` renames it into place.

    Use as a context manager: on an exception the temporary file is removed and nothing appears at
    ``path``.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tmp = temporary_name(self.path)   # the naming fsutil.leftovers finds after a crash
        self.tar = tarfile.open(self.tmp, "w")
        self.count = 0

    def write(self, key: str, codes: np.ndarray, meta: dict) -> None:
        check_key(key)
        for ext, data in ((CODES_EXT, encode_codes(codes)), (META_EXT, json.dumps(meta, sort_keys=True).encode())):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mode = 0o644
            self.tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def close(self) -> None:
        self.tar.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.tar.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def read_shard(path: str | Path | bytes):
    """Yield (key, codes, meta) from a shard (a file, or its bytes) in order; raises ``tarfile.TarError`` /
    ``ValueError`` if corrupt."""
    in_memory = isinstance(path, (bytes, bytearray))
    opened = tarfile.open(fileobj=io.BytesIO(path), mode="r") if in_memory else tarfile.open(path, "r")
    with opened as tar:
        pending: dict[str, dict] = {}
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            data = tar.extractfile(member).read()
            group = pending.setdefault(key, {})
            group[ext] = data
            if CODES_EXT in group and META_EXT in group:
                del pending[key]
                yield key, decode_codes(group[CODES_EXT]), json.loads(group[META_EXT])
        if pending:
            raise ValueError(f"shard has incomplete samples: {sorted(pending)[:3]}")
