"""The loader over shard URLs against a real HTTP server on 127.0.0.1 (and pipe: commands): the same batches
as from the local directory, exact resume, bounded memory with prefetch, retries then one clear error or
the skip policy's stand-in, an optional cache, and one-line errors for specs that do not fit."""
from __future__ import annotations

import shutil
import time
import warnings

import pytest
import torch

from benchmarks.http_server import FolderServer
from data_pipeline.loader import CorruptShardError, CorruptShardWarning, LoaderConfig, make_loader
from data_pipeline.manifest import DatasetError
from data_pipeline.sources import ShardSource, expand_braces
from mebt.errors import ConfigError

FAST = dict(timeout_s=5.0, retries=2, retry_backoff_s=0.05)


def spec(base: str, folder) -> str:
    names = sorted(p.name for p in folder.glob("train-*.tar"))
    return f"{base}/train-{{{names[0][6:12]}..{names[-1][6:12]}}}.tar"


def batches(cfg: LoaderConfig, n: int | None = None, rank: int = 0, world_size: int = 2, state=None):
    loader = make_loader(cfg, rank, world_size)
    if state is not None:
        loader.load_state_dict(state)
    out = []
    for batch in loader:
        out.append((batch["key"], batch["codes"].clone(), batch["pad"].clone()))
        if n is not None and len(out) == n:
            break
    return out, loader.state_dict()


def same(a, b) -> bool:
    return len(a) == len(b) and all(ka == kb and torch.equal(ca, cb) and torch.equal(pa, pb)
                                    for (ka, ca, pa), (kb, cb, pb) in zip(a, b))


@pytest.fixture(scope="module")
def server(codes_dir):
    with FolderServer(codes_dir) as s:
        yield s


def test_the_spec_expands_like_webdatasets_braceexpand():
    import braceexpand  # webdataset's own expansion

    for s in ("train-{000000..000127}.tar", "shard-{7..12}.tar", "x{0..3}"):
        assert expand_braces(s) == list(braceexpand.braceexpand(s))


@pytest.mark.parametrize("how", ["http spec", "http dir", "pipe spec", "file spec"])
def test_every_kind_of_url_yields_the_local_batches_and_resumes_exactly(codes_dir, server, how):
    data_dir = {"http spec": spec(server.url, codes_dir), "http dir": server.url + "/",
                "pipe spec": "pipe:cat " + spec(str(codes_dir), codes_dir),
                "file spec": "file://" + spec(str(codes_dir), codes_dir)}[how]
    common = dict(batch_size=8, shuffle=True, shuffle_buffer=100, num_workers=2, verify="sha256", **FAST)
    local, _ = batches(LoaderConfig(data_dir=str(codes_dir), **common))
    remote, _ = batches(LoaderConfig(data_dir=data_dir, **common))
    assert len(local) == len(make_loader(LoaderConfig(data_dir=str(codes_dir), **common), 0, 2)) > 3
    assert same(remote, local)
    # Resume: 3 batches, a new loader from the state, the rest: what an uninterrupted run yields.
    head, state = batches(LoaderConfig(data_dir=data_dir, **common), n=3)
    tail, _ = batches(LoaderConfig(data_dir=data_dir, **common), state=state)
    assert same(head + tail, local)


def test_at_most_k_shards_in_memory_each_fetched_again_when_needed(codes_dir, server):
    """A shuffle buffer that spans every shard with room for only 2 fetched shards: shards are dropped and
    fetched again, and the batches are still exactly the local ones."""
    common = dict(batch_size=8, shuffle=True, shuffle_buffer=300, num_workers=0, **FAST)
    local, _ = batches(LoaderConfig(data_dir=str(codes_dir), **common), world_size=1)
    before = len(server.requests)
    remote, _ = batches(LoaderConfig(data_dir=spec(server.url, codes_dir), max_shards_in_memory=2, **common),
                        world_size=1)
    assert same(remote, local)
    gets = [p for p in server.requests[before:] if p.endswith(".tar")]
    assert len(gets) > len(set(gets)) == 5   # every shard, some of them more than once
    roomy = len(server.requests)
    assert same(batches(LoaderConfig(data_dir=spec(server.url, codes_dir), max_shards_in_memory=8, **common),
                        world_size=1)[0], local)
    assert sorted(p for p in server.requests[roomy:] if p.endswith(".tar")) == sorted(set(gets))   # once each


def test_a_server_that_stops_gives_retries_then_one_clear_error(codes_dir, tmp_path):
    folder = tmp_path / "served"
    shutil.copytree(codes_dir, folder)
    with FolderServer(folder) as server:
        cfg = LoaderConfig(data_dir=spec(server.url, folder), batch_size=8, shuffle=False, on_corrupt="fail",
                           max_shards_in_memory=2, **FAST)
        loader = make_loader(cfg, 0, 1)
        it = iter(loader)
        next(it)
        server.stop()   # mid-epoch: the next shards cannot be fetched
        start = time.monotonic()
        with pytest.raises(CorruptShardError) as info:
            for _ in it:
                pass
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"cannot read '{server.url}/train-0000")
    assert "after 3 attempts (5 s timeout each)" in message and "on_corrupt: skip" in message
    assert time.monotonic() - start < 60   # bounded by timeout x attempts, never a hang


def test_skip_stands_in_for_an_unreachable_shard_and_counts_it(codes_dir, tmp_path):
    folder = tmp_path / "served"
    shutil.copytree(codes_dir, folder)
    common = dict(batch_size=8, shuffle=False, drop_last=False, **FAST)
    with FolderServer(folder) as server:
        loader = make_loader(LoaderConfig(data_dir=spec(server.url, folder), **common), 0, 1)
        (folder / "train-000002.tar").unlink()   # gone after the index was read: 404, not retried
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = [(b["key"], b["pad"]) for b in loader]
    # 300 clips padded to 38 batches of 8; the 64 clips of the missing shard are stand-ins, flagged pad.
    assert sum(len(k) for k, _ in got) == 304 and sum(int(p.sum()) for _, p in got) == 64 + 4
    skipped = [str(w.message) for w in caught if issubclass(w.category, CorruptShardWarning)]
    assert len(skipped) == 1 and skipped[0].startswith("skipped corrupt shard 'train-000002.tar': cannot read '")
    assert "HTTP 404" in skipped[0] and "(1 corrupt shard(s) skipped so far" in skipped[0]


def test_cache_dir_keeps_fetched_shards_and_reads_them_from_disk(codes_dir, server, tmp_path):
    cache = tmp_path / "cache"
    cfg = LoaderConfig(data_dir=spec(server.url, codes_dir), batch_size=8, cache_dir=str(cache), **FAST)
    local, _ = batches(LoaderConfig(data_dir=str(codes_dir), batch_size=8), world_size=1)
    first, _ = batches(cfg, world_size=1)
    cached = sorted(p.name for p in cache.rglob("*") if p.is_file())
    assert cached == [f"train-00000{i}.tar" for i in range(5)]   # whole shards, no temporary files left
    before = len(server.requests)
    second, _ = batches(cfg, world_size=1)
    assert same(first, local) and same(second, local)
    assert [p for p in server.requests[before:] if p.endswith(".tar")] == []


def test_specs_that_do_not_fit_are_one_line_errors(codes_dir, server, tmp_path):
    narrow = f"{server.url}/train-{{000000..000003}}.tar"   # the dataset has 5 shards
    with pytest.raises(DatasetError, match=r"shard 'train-000004.tar' of the dataset's shards.parquet is not in "):
        make_loader(LoaderConfig(data_dir=narrow, batch_size=8, **FAST))
    with pytest.raises(ConfigError, match="a pipe: spec names its shards with a brace range"):
        ShardSource("pipe:cat /data/train.tar")
    with pytest.raises(ConfigError, match="exactly one numeric brace range"):
        ShardSource("http://h/{a,b}-{0..3}.tar")
    empty = tmp_path / "empty"
    empty.mkdir()
    with FolderServer(empty) as bare:
        with pytest.raises(DatasetError, match=r"no merged dataset tables at 'http://127.0.0.1:\d+/manifest.parquet'"):
            make_loader(LoaderConfig(data_dir=f"{bare.url}/train-{{000000..000004}}.tar", batch_size=8, **FAST))
    elsewhere = tmp_path / "tables"
    elsewhere.mkdir()
    for name in ("dataset.json", "manifest.parquet", "shards.parquet"):
        shutil.copy(codes_dir / name, elsewhere / name)
    with FolderServer(tmp_path) as tables:   # the tables given explicitly, away from the shards
        cfg = LoaderConfig(data_dir=spec(server.url, codes_dir), meta_dir=f"{tables.url}/tables", batch_size=8, **FAST)
        assert same(batches(cfg, world_size=1)[0], batches(LoaderConfig(data_dir=str(codes_dir), batch_size=8),
                                                           world_size=1)[0])


def test_verify_and_stats_take_the_same_specs(codes_dir, server, tmp_path, capsys):
    from data_pipeline.verify import dataset_stats, verify_dataset
    from mebt.cli import main

    local = dataset_stats(codes_dir)
    for data_dir in (spec(server.url, codes_dir), server.url + "/", "pipe:cat " + spec(str(codes_dir), codes_dir)):
        assert main(["data", "verify", data_dir]) == 0
        assert f"{data_dir}: 5 shards, 300 samples checked: OK" in capsys.readouterr().out
        stats = dataset_stats(data_dir)
        assert {**stats, "dataset": None} == {**local, "dataset": None} and stats["dataset"] == data_dir
    folder = tmp_path / "served"
    shutil.copytree(codes_dir, folder)
    damaged = bytearray((folder / "train-000001.tar").read_bytes())
    damaged[-2000] ^= 0xFF   # inside the last sample's codes: the tar still parses, the hash does not match
    (folder / "train-000001.tar").write_bytes(bytes(damaged))
    (folder / "train-000003.tar").unlink()
    with FolderServer(folder) as bad:
        report = verify_dataset(spec(bad.url, folder))
    assert not report.ok and sorted(report.problems) == ["train-000001.tar", "train-000003.tar"]
    assert any("sha256 differs" in p or "codes in" in p for p in report.problems["train-000001.tar"])
    assert report.problems["train-000003.tar"][-1].startswith(f"unreadable (cannot read '{bad.url}/train-000003.tar'")


def test_the_model_shape_defaults_from_a_remote_dataset_json(codes_dir, server):
    from mebt.train.config import defaults_from_dataset

    filled = defaults_from_dataset({"data": {"data_dir": spec(server.url, codes_dir)}})
    assert filled["model"] == {"latent_shape": [2, 4, 4], "vocab_size": 8}


def test_a_server_or_command_that_never_answers_times_out_each_attempt(tmp_path):
    import socket

    from data_pipeline.sources import FetchError

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)   # connections complete in the backlog; nobody ever answers them
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/train-{{000000..000001}}.tar"
    source = ShardSource(url, timeout_s=0.5, retries=1, retry_backoff_s=0.1)
    start = time.monotonic()
    with pytest.raises(FetchError, match=r"after 2 attempts \(0.5 s timeout each\): (TimeoutError|timeout)"):
        source.fetch(source.shard_url("train-000000.tar"))
    assert time.monotonic() - start < 10
    silent.close()
    marker = tmp_path / "still-running"
    # A child of the command that would outlive a kill of the shell alone touches the marker after 1 s.
    hanging = ShardSource(f"pipe:(sleep 1; touch {marker}) & sleep 30; cat x-{{0..1}}.tar", timeout_s=0.5,
                          retries=0)
    with pytest.raises(FetchError, match=r"ran more than 0.5 s"):
        hanging.fetch(hanging.shard_url("x-0.tar"))
    time.sleep(2.0)
    assert not marker.exists()   # the whole process group was killed
