import json
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from benchmarks import loader_throughput
from data_pipeline import shard_reader as reader_module
from data_pipeline.loader import CorruptShardError, CorruptShardWarning, LoaderConfig, make_loader
from data_pipeline.loader_state import shuffle_buffer_order
from data_pipeline.manifest import MANIFEST, SHARD_SCHEMA, SHARDS, DatasetError
from data_pipeline.shard_format import ShardWriter
from data_pipeline.shard_reader import _tarfile_members, read_clips, tar_members
from mebt.config import from_dict
from mebt.errors import ConfigError, UserError
from tests.helpers.loader import (
    GRID,
    VOCAB,
    assert_same_batches,
    build_dataset,
    check_codes,
    clip_codes,
    config,
    damage,
    global_steps,
    padded_dataset,
    sample_ids,
    take,
)


def test_every_sample_once_per_epoch_across_ranks_and_workers(tmp_path):
    # 40 samples in uneven shards; 2 ranks x 2 workers x batch 4: 5 batches per rank, nothing left over.
    root = build_dataset(tmp_path / "ds", [7, 13, 4, 16])
    seen = Counter()
    for rank in range(2):
        loader = make_loader(config(root, num_workers=2), rank, 2, expect_grid=GRID, expect_vocab=VOCAB)
        assert loader.batches_per_epoch == len(loader) == 5
        batches = list(loader)
        assert [b["batch_index"] for b in batches] == list(range(5)) and {b["epoch"] for b in batches} == {0}
        for b in batches:
            assert b["codes"].dtype == torch.int64 and b["codes"].shape == (4, *GRID)
            check_codes(b)
            assert b["video_id"] == [f"vid{n // 3}" for n in sample_ids(b)]
            assert b["start"].tolist() == sample_ids(b) and b["fps"].tolist() == [8.0] * 4
            assert not b["pad"].any()
            seen.update(sample_ids(b))
        assert (loader.epoch, loader.position) == (1, 0)
    assert seen == Counter(range(40))


@pytest.mark.filterwarnings("ignore:This DataLoader will create 5 worker processes")
@pytest.mark.parametrize("num_workers", [0, 5])
def test_uneven_counts_drop_or_pad_with_equal_batches_per_rank(tmp_path, num_workers):
    # 37 samples, 3 ranks x batch 4 = 12 per round: drop_last keeps 3 rounds (36), padding makes 4 (48).
    # With 5 workers and 3-4 batches per rank some workers have nothing to do.
    root = build_dataset(tmp_path / "ds", [5, 20, 12])
    for drop_last, per_rank in ((True, 3), (False, 4)):
        ids, pads = [], []
        for rank in range(3):
            loader = make_loader(config(root, num_workers=num_workers, drop_last=drop_last), rank, 3)
            batches = list(loader)
            assert loader.batches_per_epoch == len(batches) == per_rank
            for b in batches:
                check_codes(b)
                ids += sample_ids(b)
                pads += b["pad"].tolist()
        counts = Counter(ids)
        if drop_last:
            assert len(ids) == 36 and max(counts.values()) == 1 and not any(pads)
        else:
            assert len(ids) == 48 and set(counts) == set(range(37)) and sum(pads) == 11
            assert sum(c - 1 for c in counts.values()) == 11


def test_shuffle_changes_with_epoch_and_seed_and_is_reproducible(tmp_path):
    root = build_dataset(tmp_path / "ds", [16, 16, 16, 16])

    def orders(seed=0, epochs=2, **kw):
        loader = make_loader(config(root, seed=seed, **kw), 0, 1)
        return [[n for b in loader for n in sample_ids(b)] for _ in range(epochs)]

    first, second = orders()
    assert sorted(first) == sorted(second) == list(range(64))
    assert first != second and orders() == [first, second]
    assert orders(seed=1)[0] != first
    assert orders(shuffle=False) == [list(range(64))] * 2
    # The buffer mixes shards (the 16 samples of a shard are spread out) yet stays local.
    assert len({n // 16 for n in first[:16]}) > 1
    loader = make_loader(config(root), 0, 1)
    loader.set_epoch(1)
    assert [n for b in loader for n in sample_ids(b)] == second


def test_shuffle_buffer_order_is_a_local_permutation():
    order = shuffle_buffer_order(1000, 50, np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(1000))
    assert (order < np.arange(1000) + 50).all()   # an item leaves at most a buffer's length early
    assert (order[:-50] != np.arange(950)).mean() > 0.9
    assert np.array_equal(order, shuffle_buffer_order(1000, 50, np.random.default_rng(0)))


@pytest.mark.filterwarnings("ignore::data_pipeline.loader.CorruptShardWarning")
@pytest.mark.parametrize("damaged", [False, True])
def test_exact_resume_two_ranks_two_workers(tmp_path, damaged):
    # 44 clips of 4 frames cropped to 2 (seeded offsets are part of what must resume); padding on:
    # 6 batches per rank, 3 from each worker. Damaged: the stand-ins for a corrupt shard resume too.
    root, cfg = padded_dataset(tmp_path, damaged)
    for rank in range(2):
        reference = take(make_loader(cfg, rank, 2), 15)
        assert [b["epoch"] for b in reference] == [0] * 6 + [1] * 6 + [2] * 3
        if damaged:
            assert not {n for b in reference for n in sample_ids(b)} & set(range(9, 23))
        # Stops: mid-epoch before a batch of worker 1, at the epoch boundary, and inside epoch 1.
        for stop in (3, 6, 10):
            loader = make_loader(cfg, rank, 2)
            before = take(loader, stop)
            state = json.loads(json.dumps(loader.state_dict()))
            assert (state["epoch"], state["position"]) == divmod(stop, 6)
            resumed = make_loader(cfg, rank, 2)
            resumed.load_state_dict(state)
            assert_same_batches(before + take(resumed, 15 - stop), reference)


def test_resume_rejects_other_settings(tmp_path):
    root = build_dataset(tmp_path / "ds", [8, 8])
    other = build_dataset(tmp_path / "other", [8, 8], prefix="more")   # the same counts in other shards
    state = make_loader(config(root), 0, 2).state_dict()
    for cfg, world, accum, text in ((config(root), 1, 1, r"saved taking 8 clips per step \(2 process\(es\) x 1 "
                                                         r"micro-batch\(es\) x 4\) and now takes 4 \(1 x 1 x 4\)"),
                                    (config(other), 2, 1, r"settings changed: dataset \(saved"),
                                    (config(root, seed=1), 1, 2, r"settings changed: seed \(saved 0, now 1\)")):
        with pytest.raises(ConfigError, match=text):
            make_loader(cfg, 0, world, accum=accum).load_state_dict(state)
    with pytest.raises(ConfigError, match="stream seeds"):
        make_loader(config(root), 0, 2).load_state_dict({**state, "stream_seeds": [1]})
    # Inside a step of 2 batches a state resumes only its own layout.
    loader = make_loader(config(root), 0, 1, accum=2)
    take(loader, 1)
    inside = loader.state_dict()
    with pytest.raises(ConfigError, match="inside an optimizer step of 2 batches"):
        make_loader(config(root), 0, 2).load_state_dict(inside)
    make_loader(config(root), 0, 1, accum=2).load_state_dict(inside)


@pytest.mark.filterwarnings("ignore::data_pipeline.loader.CorruptShardWarning")
@pytest.mark.parametrize("first, damaged", [((2, 4, 1, 2), False), ((2, 4, 1, 2), True), ((1, 4, 2, 1), False)])
def test_elastic_resume_keeps_every_global_batch_and_each_sample_once(tmp_path, first, damaged):
    # 50 clips of 4 frames cropped to 2, uneven shards; 8 clips per step: 6 steps per epoch, 2 dropped.
    # first: the first start's (processes, clips per micro-batch, micro-batches per step, workers).
    root = build_dataset(tmp_path / "ds", [7, 13, 4, 16, 10], frames=[4] * 50)
    if damaged:   # the stand-ins for a corrupt shard follow the slots too
        damage(root / "train-000001.tar", "truncate")
    base = {"crop_frames": 2, "shuffle_buffer": 6}

    def loaders(world, batch, accum, workers):
        return [make_loader(config(root, batch_size=batch, num_workers=workers, **base), r, world, accum=accum)
                for r in range(world)]

    reference = global_steps(loaders(*first), first[2], 15)
    for layouts in ([(1, 4, 2, 0)], [(1, 8, 1, 2)], [(2, 4, 1, 0)], [(4, 2, 1, 1)], [(1, 4, 2, 2), (2, 2, 2, 0)]):
        if layouts[0][:3] == first[:3] and max(1, layouts[0][3]) == max(1, first[3]):
            continue   # the first start's own layout
        stop = 4   # inside epoch 0; a chained resume stops again inside epoch 1
        run = loaders(*first)
        got = global_steps(run, first[2], stop)
        state = json.loads(json.dumps(run[-1].state_dict()))
        for i, (world, batch, accum, workers) in enumerate(layouts):
            resumed = loaders(world, batch, accum, workers)
            for loader in resumed:
                loader.load_state_dict(state)
            assert all(loader.elastic for loader in resumed)
            n = 15 - stop if i == len(layouts) - 1 else 5
            got += global_steps(resumed, accum, n)
            stop += n
            state = json.loads(json.dumps(resumed[-1].state_dict()))
            assert (state["plan"]["world_size"], state["plan"]["accum"]) == first[::2]   # the first start's slots
        assert len(got) == len(reference)
        for a, b in zip(got, reference):
            assert (a["key"], a["epoch"]) == (b["key"], b["epoch"])
            for name in ("codes", "frame_offset", "pad", "sample_id"):
                assert torch.equal(a[name], b[name])
            check_codes(a, [4] * 50)
    # Each epoch takes 48 different slots, once each; without damage, 48 different clips.
    for epoch in (0, 1):
        batches = [b for b in reference if b["epoch"] == epoch]
        assert sorted(torch.cat([b["sample_id"] for b in batches]).tolist()) == list(range(48))
        if not damaged:
            assert len({k for b in batches for k in b["key"]}) == 48
    # Back on the first layout the saved plan is this loader's own again.
    back = loaders(*first)
    for loader in back:
        loader.load_state_dict(state)
    assert not any(loader.elastic for loader in back)


@pytest.mark.parametrize("how, verify", [("truncate", "size"), ("out_of_range", "size"), ("swap", "size"),
                                         ("flip", "sha256"), ("flip", "sha256-once"), ("flip", None)])
def test_corrupt_shard_is_skipped_with_a_counted_warning(tmp_path, how, verify):
    """A flipped bit that keeps codes in range is caught by the sha256 check, which by default (None) runs
    the first time a process reads each shard."""
    root = build_dataset(tmp_path / "ds", [8, 8, 8, 8])
    damage(root / "train-000001.tar", how)
    ids, pads, corrupt = [], 0, set()
    with pytest.warns(CorruptShardWarning) as record:
        for rank in range(2):
            loader = make_loader(config(root, num_workers=2, **({"verify": verify} if verify else {})), rank, 2)
            batches = list(loader)
            assert len(batches) == loader.batches_per_epoch == 4
            for b in batches:
                assert b["codes"].shape == (4, *GRID)
                check_codes(b)
                ids += sample_ids(b)
                pads += int(b["pad"].sum())
            corrupt |= set(loader.state_dict()["corrupt_shards"])
    assert corrupt == {"train-000001.tar"}
    assert not set(ids) & set(range(8, 16)) and len(ids) == 32
    assert pads == 8   # each of the shard's 8 slots got a stand-in
    messages = [str(w.message) for w in record]
    assert all("train-000001.tar" in m for m in messages) and "1 corrupt shard(s) skipped so far" in messages[0]


def test_sha256_once_hashes_a_shard_once_per_process_while_it_is_unchanged(tmp_path, monkeypatch):
    root = build_dataset(tmp_path / "ds", [8, 8])
    hashed = []
    real = reader_module.hashlib.sha256
    shard_bytes = {(root / f"train-00000{i}.tar").stat().st_size for i in (0, 1)}
    # hashlib is one module: count only hashes of whole shards (the index hashes its own identity too).
    monkeypatch.setattr(reader_module.hashlib, "sha256",
                        lambda data=b"": (len(data) in shard_bytes and hashed.append(len(data))) or real(data))
    loader = make_loader(config(root), 0, 1)   # the default: sha256-once, in this process (no workers)
    for _ in range(3):
        assert sorted(i for b in loader for i in sample_ids(b)) == list(range(16))
    assert len(hashed) == 2   # each shard once over three epochs
    every = make_loader(config(root, verify="sha256"), 0, 1)
    for _ in range(2):
        list(every)
    assert len(hashed) == 2 + 4


@pytest.mark.parametrize("how", ["out_of_range", "swap"])
def test_shard_changed_between_epochs_is_checked_again(tmp_path, how):
    # Later epochs reuse a shard's checked tar layout only while the file is the one that was checked.
    root = build_dataset(tmp_path / "ds", [8, 8])
    loader = make_loader(config(root), 0, 1)
    assert sorted(i for b in loader for i in sample_ids(b)) == list(range(16))
    time.sleep(0.05)   # past the file system's timestamp granularity, as any real rewrite would be
    damage(root / "train-000001.tar", how)
    with pytest.warns(CorruptShardWarning, match="train-000001.tar"):
        ids = [i for b in loader for i in sample_ids(b)]
    assert len(ids) == 16 and not set(ids) & set(range(8, 16))


def test_unevenly_spaced_clips_are_copied_out_correctly(tmp_path):
    # A metadata member over one tar block breaks the even spacing that lets clips be a view of the file.
    path = tmp_path / "uneven-000000.tar"
    with ShardWriter(path) as writer:
        for n in range(4):
            writer.write(f"c{n}", clip_codes(n), {"source": "x" * (700 if n == 1 else 5)})
    clips = read_clips(path, size=path.stat().st_size, sha256=None,
                       members=np.array([f"c{n}.codes.npy".encode() for n in range(4)]),
                       shapes=np.array([GRID] * 4), vocab=VOCAB)
    assert np.array_equal(clips, np.stack([clip_codes(n) for n in range(4)]))


def test_corrupt_shard_samples_are_replaced_from_the_next_readable_shard(tmp_path):
    root = build_dataset(tmp_path / "ds", [8, 8, 8])
    damage(root / "train-000000.tar", "truncate")
    damage(root / "train-000002.tar", "truncate")
    with pytest.warns(CorruptShardWarning):
        batches = list(make_loader(config(root, shuffle=False), 0, 1))
    # In shard order 0, 1, 2 (no shuffling) both corrupt shards take the next readable one, shard 1,
    # sample by sample; it wraps around from shard 2.
    assert [sample_ids(b) for b in batches] == [[8, 9, 10, 11], [12, 13, 14, 15]] * 3
    assert [b["pad"].all().item() for b in batches] == [True, True, False, False, True, True]
    assert not any(b["pad"].any() for b in batches[2:4])


def test_corrupt_shard_fails_with_workers_when_asked(tmp_path):
    root = build_dataset(tmp_path / "ds", [8, 8, 8, 8])
    damage(root / "train-000002.tar", "truncate")
    loader = make_loader(config(root, num_workers=2, on_corrupt="fail"), 0, 1)
    with pytest.raises(CorruptShardError) as info:
        list(loader)
    assert "train-000002.tar' is corrupt" in str(info.value) and "\n" not in str(info.value)


def test_errors_are_one_line_user_errors(tmp_path):
    root = build_dataset(tmp_path / "ds", [6, 6])
    no_manifest = build_dataset(tmp_path / "no_manifest", [6])
    (no_manifest / MANIFEST).unlink()
    no_shard = build_dataset(tmp_path / "no_shard", [6, 6])
    (no_shard / "train-000001.tar").unlink()
    miscounted = build_dataset(tmp_path / "miscounted", [6, 6])
    shards = pq.read_table(miscounted / SHARDS).to_pylist()
    shards[1]["num_samples"] = 7
    pq.write_table(pa.Table.from_pylist(shards, schema=SHARD_SCHEMA), miscounted / SHARDS)
    state = make_loader(config(root), 0, 2).state_dict()
    cases = [
        (lambda: make_loader(config(miscounted)), DatasetError, "disagree on the samples of some shard"),
        (lambda: from_dict(LoaderConfig, {"data_dir": "x", "batch": 4}), ConfigError, "did you mean 'batch_size'"),
        (lambda: from_dict(LoaderConfig, {"data_dir": "x", "on_corrupt": "no"}), ConfigError, "'skip', 'fail'"),
        (lambda: make_loader(config(tmp_path / "nowhere")), DatasetError, "does not exist"),
        (lambda: make_loader(config(no_manifest)), DatasetError, "manifest.parquet missing"),
        (lambda: make_loader(config(no_shard)), DatasetError, "'train-000001.tar' listed in the manifest is missing"),
        (lambda: make_loader(config(root), expect_grid=(4, 4, 4)), DatasetError,
         r"model.latent_shape \[4, 4, 4\] \(the dataset's clip grid: \[2, 4, 4\]\)"),
        (lambda: make_loader(config(root), expect_vocab=16384), DatasetError,
         r"model.vocab_size 16384 \(the dataset's codebook: 1000\)"),
        # every mismatch in one line
        (lambda: make_loader(config(root), expect_grid=(4, 4, 4), expect_vocab=16384), DatasetError,
         r"latent_shape \[4, 4, 4\].*; model.vocab_size 16384.*leave these keys out"),
        (lambda: make_loader(config(root, split="val")), DatasetError, "no samples of split 'val'"),
        (lambda: make_loader(config(root, batch_size=8), 0, 2), ConfigError,
         r"fewer than one step.s \(2 rank\(s\) x 1 micro-batch\(es\) x data.batch_size 8\); "
         r"set data.batch_size to at most 6"),
        (lambda: make_loader(config(root), 2, 2), ConfigError, "rank 2"),
        (lambda: config(root, batch_size=0), ConfigError, "'batch_size' must be >= 1"),
        (lambda: LoaderConfig(), ConfigError, "'data_dir' is empty"),
        (lambda: make_loader(config(root), 0, 2).load_state_dict({**state, "position": 9}), ConfigError, "position 9"),
    ]
    for make, cls, text in cases:
        with pytest.raises(cls, match=text) as info:
            make()
        assert isinstance(info.value, UserError) and "\n" not in str(info.value)


def test_crop_frames_batches_clips_of_different_lengths(tmp_path):
    frames = [3 + n % 4 for n in range(24)]   # T' from 3 to 6
    root = build_dataset(tmp_path / "ds", [10, 14], frames=frames)
    with pytest.raises(ConfigError, match="differ in length"):
        make_loader(config(root), 0, 1)
    with pytest.raises(ConfigError, match="'crop_frames' \\(4\\) exceeds the shortest clip"):
        make_loader(config(root, crop_frames=4), 0, 1)

    def offsets_by_epoch():
        loader = make_loader(config(root, crop_frames=3), 0, 1, expect_grid=(3, *GRID[1:]))
        epochs = []
        for _ in range(2):
            offsets = {}
            for b in loader:
                assert b["codes"].shape == (4, 3, *GRID[1:])
                check_codes(b, frames)
                offsets.update(zip(sample_ids(b), b["frame_offset"].tolist()))
            epochs.append(offsets)
        return epochs

    first, second = offsets_by_epoch()
    assert all(0 <= first[n] <= frames[n] - 3 for n in first) and len(set(first.values())) == 4
    assert first != second and offsets_by_epoch() == [first, second]


def test_split_filter(tmp_path):
    root = build_dataset(tmp_path / "ds", [12, 12], splits=["val" if n % 4 == 0 else "train" for n in range(24)])
    batches = list(make_loader(config(root, split="val", batch_size=2), 0, 1))
    assert sorted(n for b in batches for n in sample_ids(b)) == list(range(0, 24, 4))
    assert {s for b in batches for s in b["split"]} == {"val"}


def test_tar_parser_matches_tarfile_and_falls_back_for_long_names(tmp_path, monkeypatch):
    root = build_dataset(tmp_path / "ds", [5])
    buf = (root / "train-000000.tar").read_bytes()
    slow = _tarfile_members(buf)
    fallbacks = []
    # This module's own reference to the tarfile parser stays unpatched.
    monkeypatch.setattr(reader_module, "_tarfile_members", lambda data: fallbacks.append(1) or _tarfile_members(data))
    fast = tar_members(buf)
    assert not fallbacks and len(fast[0]) == 10
    assert all(np.array_equal(a, b) for a, b in zip(fast, slow))
    # A key over 100 characters needs a pax header, which the numpy parser leaves to tarfile.
    path, long_key = tmp_path / "long-000000.tar", "k" * 150
    with ShardWriter(path) as writer:
        writer.write(long_key, clip_codes(5), {})
        writer.write("short", clip_codes(6), {})
    clips = read_clips(path, size=path.stat().st_size, sha256=None,
                       members=np.array([f"{long_key}.codes.npy".encode(), b"short.codes.npy"]),
                       shapes=np.array([GRID, GRID]), vocab=VOCAB)
    assert fallbacks == [1] and np.array_equal(clips, np.stack([clip_codes(5), clip_codes(6)]))


def test_benchmark_quick_writes_consistent_json(tmp_path, capsys):
    path = tmp_path / "loader.json"
    returned = loader_throughput.main(["--quick", "--clips", "600", "--batch-size", "64", "--json", str(path)])
    result = json.loads(path.read_text())
    assert result == json.loads(json.dumps(returned)) and result["benchmark"] == "loader_throughput"
    raw, single, http, worker, http_worker, once, hashed, workers = result["rows"]
    assert raw["clips"] == 600 and {r["clips"] for r in result["rows"][1:]} == {576}   # 9 batches of 64
    assert [(r["name"], r["workers"], r["verify"]) for r in result["rows"]] == [
        ("raw in-memory bound", 0, None), ("loader, 1 process", 0, "size"), ("loader, 1 process, HTTP", 0, "size"),
        ("loader, 1 worker", 1, "size"), ("loader, 1 worker, HTTP", 1, "size"),
        ("loader, 1 process, sha256 once (default)", 0, "sha256-once"),
        ("loader, 1 process, sha256 every read", 0, "sha256"), ("loader, 2 workers", 2, "size")]
    assert result["http_fraction_of_local"] == {
        "1_worker": pytest.approx(http_worker["clips_per_s"] / worker["clips_per_s"]),
        "main_process": pytest.approx(http["clips_per_s"] / single["clips_per_s"])}
    for row in result["rows"]:
        assert row["clips_per_s"] == pytest.approx(row["clips"] / row["seconds"])
        assert row["fraction_of_raw"] == pytest.approx(row["clips_per_s"] / raw["clips_per_s"])
    out = capsys.readouterr().out
    assert "target >= 20000" in out and "target >= 0.5" in out and "load average" in out
