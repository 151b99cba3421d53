"""Verifying a preprocessed dataset against its manifest, and its statistics."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline.manifest import (
    MANIFEST,
    SAMPLE_SCHEMA,
    SHARD_SCHEMA,
    SHARDS,
    DatasetError,
    part_path,
    read_part,
    write_dataset_json,
)
from data_pipeline.preprocess import preprocess, write_code_shard
from data_pipeline.shard_format import ShardWriter, read_shard
from data_pipeline.verify import dataset_stats, format_stats, verify_dataset
from mebt.cli import main
from tests.helpers.preprocess import GRID, N_CODES, make_config


@pytest.fixture(scope="module")
def dataset(data, tmp_path_factory):
    """One video per shard: shard 0 is the unreadable video (empty), shards 1-7 hold 2 clips each."""
    out = tmp_path_factory.mktemp("verify") / "codes"
    preprocess(make_config(data, out, videos_per_shard=1))
    return out


@pytest.fixture
def copy(dataset, tmp_path):
    out = tmp_path / "codes"
    shutil.copytree(dataset, out)
    return out


def _member(path, suffix: str) -> tarfile.TarInfo:
    with tarfile.open(path) as tar:
        return next(m for m in tar.getmembers() if m.name.endswith(suffix))


def _patch(path, offset: int, transform) -> None:
    data = bytearray(path.read_bytes())
    data[offset] = transform(data[offset])
    path.write_bytes(bytes(data))


def _write_raw_shard(path, samples) -> None:
    """A shard written without ShardWriter's checks, so it can hold codes of the wrong dtype."""
    with tarfile.open(path, "w") as tar:
        for key, codes, meta in samples:
            buf = io.BytesIO()
            np.save(buf, codes)
            for name, blob in ((f"{key}.codes.npy", buf.getvalue()), (f"{key}.json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))


def test_a_fresh_dataset_verifies(dataset):
    report = verify_dataset(dataset)
    assert report.ok and report.lines() == []
    assert (report.shards_checked, report.samples_checked) == (8, 14)
    assert report.summary().endswith("8 shards, 14 samples checked: OK")


def test_verify_names_every_bad_shard_once(copy):
    shard = {i: copy / f"train-{i:06d}.tar" for i in range(8)}
    # 1: truncated mid-file, as by a full disk or an interrupted copy.
    shard[1].write_bytes(shard[1].read_bytes()[:1500])
    # 2: the last byte of a codes member is the high byte of an int16 code: flipping it leaves the codebook.
    codes = _member(shard[2], "codes.npy")
    _patch(shard[2], codes.offset_data + codes.size - 1, lambda b: b ^ 0xFF)
    # 3: a JSON member that no longer parses.
    _patch(shard[3], _member(shard[3], ".json").offset_data, lambda b: ord("X"))
    shard[4].unlink()
    # 5: intact samples in the wrong order.
    samples = list(read_shard(shard[5]))
    with ShardWriter(shard[5]) as writer:
        for key, grid, meta in reversed(samples):
            writer.write(key, grid, meta)
    # 7: codes of the wrong dtype, then of the wrong shape.
    (key0, grid0, meta0), (key1, grid1, meta1) = read_shard(shard[7])
    _write_raw_shard(shard[7], [(key0, grid0.astype(np.int32), meta0), (key1, grid1[:1], meta1)])
    shutil.copy(shard[6], copy / "train-000042.tar")

    report = verify_dataset(copy)

    assert not report.ok
    lines = dict(line.split(": ", 1) for line in report.lines())
    assert sorted(lines) == [f"train-{i:06d}.tar" for i in (1, 2, 3, 4, 5, 7, 42)]
    assert "the manifest recorded" in lines["train-000001.tar"]
    assert "outside the codebook [0, 32)" in lines["train-000002.tar"] and "sha256 differs" in lines["train-000002.tar"]
    assert "unreadable after 0 samples (JSONDecodeError" in lines["train-000003.tar"]
    assert lines["train-000004.tar"] == "missing"
    swapped = "sample 0 has key 'train-000005-000001', the manifest lists 'train-000005-000000'"
    assert swapped in lines["train-000005.tar"]
    assert "dtype int32, expected int16" in lines["train-000007.tar"]
    assert f"shape [1, 4, 4], expected {GRID}" in lines["train-000007.tar"]
    assert lines["train-000042.tar"] == "not in the manifest"


def test_verify_flags_metadata_that_disagrees_with_the_manifest(copy):
    path = copy / "train-000006.tar"
    samples = list(read_shard(path))
    with ShardWriter(path) as writer:
        for key, grid, meta in samples:
            writer.write(key, grid, {**meta, "start": meta["start"] + 1})
    lines = verify_dataset(copy).lines()
    assert len(lines) == 1 and lines[0].startswith("train-000006.tar: sample 'train-000006-000000': json fields start")


def test_a_dataset_of_no_clips_fails(tmp_path, capsys):
    # What preprocessing wrote before it refused to merge 0 clips: a complete dataset of empty shards.
    out = tmp_path / "empty"
    out.mkdir()
    write_code_shard(out, "train-000000.tar", [], GRID, [{"video_id": "a", "source": "a.mp4"}])
    write_dataset_json(out, {"prefix": "train", "split": "train", "num_shards": 1, "grid": GRID,
                             "codebook_size": N_CODES, "complete": True})
    _, meta = read_part(part_path(out, "train-000000.tar"))
    pq.write_table(SAMPLE_SCHEMA.empty_table(), out / MANIFEST)
    pq.write_table(pa.Table.from_pylist([{k: meta[k] for k in SHARD_SCHEMA.names}], schema=SHARD_SCHEMA), out / SHARDS)

    report = verify_dataset(out)
    assert not report.ok and report.lines() == [] and report.shards_checked == 1
    assert main(["data", "verify", str(out)]) == 1
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 1 and printed[0].endswith("0 samples checked: FAILED: the dataset has no clips "
                                                     "(dataset.json lists the skipped videos); preprocess usable "
                                                     "videos into a new output dir")


def test_verify_refuses_an_unmerged_dataset(copy):
    (copy / "manifest.parquet").unlink()
    with pytest.raises(DatasetError, match="has no merged manifest .*run mebt data merge DIR"):
        verify_dataset(copy)


def test_stats_count_clips_and_code_usage(dataset):
    usage = Counter()
    for path in sorted(dataset.glob("train-*.tar")):
        for _, codes, _ in read_shard(path):
            usage.update(codes.ravel().tolist())
    stats = dataset_stats(dataset)
    assert (stats["videos"], stats["clips"], stats["shards"], stats["skipped_videos"]) == (7, 14, 8, 1)
    assert stats["per_split"] == {"train": {"videos": 7, "clips": 14}}
    assert stats["bytes"] == sum(p.stat().st_size for p in dataset.glob("train-*.tar"))
    code_usage = stats["code_usage"]
    assert code_usage["used_codes"] == len(usage) and code_usage["codebook_size"] == N_CODES
    assert 1.0 <= code_usage["perplexity"] <= len(usage)
    top_code, top_fraction = code_usage["top_codes"][0]
    assert usage[top_code] == max(usage.values()) and top_fraction == usage[top_code] / sum(usage.values())
    text = format_stats(stats)
    assert f"{len(usage)} / {N_CODES} codes used" in text and "train: 7 videos / 14 clips" in text


def test_stats_refuse_an_unreadable_shard(copy):
    (copy / "train-000003.tar").write_bytes(b"\0" * 10)
    with pytest.raises(DatasetError, match="train-000003.tar' is unreadable .*run mebt data verify"):
        dataset_stats(copy)


def test_stats_refuse_codes_outside_the_codebook(copy, capsys):
    """A histogram would silently drop them; stats fail with one line like verify does."""
    codes = _member(copy / "train-000002.tar", "codes.npy")
    _patch(copy / "train-000002.tar", codes.offset_data + codes.size - 1, lambda b: b ^ 0xFF)
    assert main(["data", "stats", str(copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"mebt: error: shard '{copy / 'train-000002.tar'}', sample '")
    assert "outside the codebook [0, 32); run mebt data verify" in err
