"""mebt.fsutil: the one atomic write, leftovers of killed writers, hashes and seeding."""
import errno
import hashlib
import json
import os
import random
import subprocess

import numpy as np
import pytest
import torch

from mebt.errors import WriteError
from mebt.fsutil import atomic_write, file_sha256, leftovers, seed_everything, temporary_name, write_bytes, write_json


def test_atomic_write_renames_on_success_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "sub" / "a.npy"
    with atomic_write(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".a.tmp-") and tmp.suffix == ".npy"
        np.save(tmp, np.arange(3))   # np.save keeps a path that already ends in .npy
    assert np.array_equal(np.load(target), np.arange(3)) and os.listdir(target.parent) == ["a.npy"]
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            np.save(tmp, np.arange(5))
            raise RuntimeError("the writer failed half way")
    assert np.array_equal(np.load(target), np.arange(3)) and os.listdir(target.parent) == ["a.npy"]


def test_leftovers_are_the_temporary_names_of_any_process(tmp_path):
    target = tmp_path / "train-000001.tar"
    mine, killed = temporary_name(target), tmp_path / ".train-000001.tmp-99999.tar"
    for path in (mine, killed, tmp_path / ".train-000002.tmp-1.tar", tmp_path / ".train-000001.tmp-1.parquet"):
        path.write_bytes(b"x")
    assert leftovers(target) == sorted([mine, killed]) and leftovers(tmp_path / "none" / "x.tar") == []


def test_write_json_hash_and_seed(tmp_path):
    write_json(tmp_path / "r.json", {"b": 1, "a": [1, 2]})
    assert json.loads((tmp_path / "r.json").read_text()) == {"b": 1, "a": [1, 2]}
    write_bytes(tmp_path / "blob", b"abc" * 1_000_000)
    assert file_sha256(tmp_path / "blob") == hashlib.sha256(b"abc" * 1_000_000).hexdigest()
    seed_everything(3)
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(3)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


@pytest.fixture
def small_disk(tmp_path):
    """A real 64 KiB file system (tmpfs; the tests run as root, as `make test` does)."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_failed_write_is_one_line_with_the_path_and_errno_and_keeps_the_previous_file(small_disk):
    target = small_disk / "model.pt"
    write_bytes(target, b"previous")
    with pytest.raises(WriteError) as info:   # a full disk
        write_bytes(target, b"x" * 200_000)
    assert str(info.value) == (f"cannot write '{target}': No space left on device (ENOSPC); any previous file there "
                               "is unchanged; free space, fix the permissions or choose another path")
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"previous" and not leftovers(target)
    with pytest.raises(WriteError, match=f"cannot write '{target}/x.pt': '{target}' is a file, not a folder"):
        write_bytes(target / "x.pt", b"new")
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)   # a read-only folder
    with pytest.raises(WriteError, match=r"Read-only file system \(EROFS\)"):
        write_bytes(target, b"new")
    assert target.read_bytes() == b"previous"
