import tarfile

import numpy as np
import pytest

from data_pipeline.shard_format import ShardWriter, read_shard, shard_name


def test_round_trip_and_names(tmp_path):
    path = tmp_path / shard_name("train", 3)
    assert path.name == "train-000003.tar"
    grids = [np.random.default_rng(i).integers(0, 16384, (4, 16, 16)) for i in range(3)]
    with ShardWriter(path) as w:
        for i, g in enumerate(grids):
            w.write(f"vid{i}_000{i}", g, {"video_id": f"vid{i}", "start": i})
    out = list(read_shard(path))
    assert [k for k, _, _ in out] == ["vid0_0000", "vid1_0001", "vid2_0002"]
    for (key, codes, meta), g in zip(out, grids):
        assert codes.dtype == np.int16 and np.array_equal(codes, g)
    assert out[2][2] == {"video_id": "vid2", "start": 2}
    with tarfile.open(path) as tar:
        assert tar.getnames()[:2] == ["vid0_0000.codes.npy", "vid0_0000.json"]


def test_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / "x-000000.tar"
    with pytest.raises(ValueError):
        with ShardWriter(path) as w:
            w.write("ok", np.zeros((1, 2, 2), dtype=np.int64), {})
            w.write("bad.key", np.zeros((1, 2, 2)), {})
    assert list(tmp_path.iterdir()) == []


def test_rejects_bad_codes(tmp_path):
    with ShardWriter(tmp_path / "y-000000.tar") as w:
        with pytest.raises(ValueError, match="T', H', W'"):
            w.write("a", np.zeros((2, 2)), {})
        with pytest.raises(ValueError, match="must be in"):
            w.write("a", np.full((1, 1, 1), 40000), {})
