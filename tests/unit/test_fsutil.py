"""mebt.fsutil: the one atomic write, leftovers of killed writers, hashes and seeding."""
import hashlib
import json
import os
import random

import numpy as np
import pytest
import torch

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
