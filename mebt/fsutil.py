"""File helpers every layer uses: atomic writes, content hashes, seeding.

``atomic_write(path)`` is the one way mebt writes a file: the content goes to a temporary name in the
same folder (so the rename is atomic on one file system) and is renamed onto ``path`` only when the
writer finished without an exception; a crash or a failed write leaves the previous file (or none) and
no partial file under the final name. The temporary name keeps the file's suffix, so writers that add a
suffix when it is missing (``np.save``, ``np.savez``) write exactly where they are told.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import random
from pathlib import Path
from typing import Iterator

from mebt.errors import WriteError


def temporary_name(path: str | Path) -> Path:
    """A hidden name beside ``path``, unique per process, with the same suffix."""
    path = Path(path)
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


def leftovers(path: str | Path) -> list[Path]:
    """Temporary files that interrupted ``atomic_write``s of ``path`` (by any process) left behind."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    return sorted(path.parent.glob(f".{glob.escape(path.stem)}.tmp-*{glob.escape(path.suffix)}"))


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success rename it onto ``path`` (parent folders are created). A
    failed write (full disk, read-only folder, a file in the way) raises ``WriteError``: one line with the
    path and the errno; the previous file is untouched."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        blocker = next((p for p in path.parents if p.is_file()), None)
        raise WriteError.of(path, e, blocker) from None
    except OSError as e:
        raise WriteError.of(path, e) from None
    tmp = temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except WriteError:
        raise
    except OSError as e:
        raise WriteError.of(path, e) from None
    finally:
        with contextlib.suppress(OSError):   # on a read-only file system there is nothing to remove
            tmp.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | Path, obj, **dump_args) -> None:
    """``obj`` as indented JSON (a trailing newline), written atomically."""
    write_text(path, json.dumps(obj, indent=2, **dump_args) + "\n")


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks (shards, tokenizers and weights are recorded by it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (all devices) with ``seed``."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
