"""Preprocessing videos into code shards: contents, resuming, task splits, workers and input errors."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from benchmarks import preprocess_throughput
from data_pipeline.manifest import DatasetError, merge_manifest
from data_pipeline.preprocess import PreprocessError, ShardMaker, preprocess
from data_pipeline.shard_format import read_shard
from data_pipeline.synthetic_videos import split_indices, video_id
from data_pipeline.verify import dataset_stats, verify_dataset
from data_pipeline.video import ClipConfig, iter_clips, list_videos
from mebt.cli import main
from mebt.errors import ConfigError, UserError
from mebt.media import write_gif, write_mp4
from mebt.tokenizer.checkpoint import load_tokenizer, save_tokenizer, tokenizer_sha256
from tests.helpers.preprocess import CLIP, GRID, N_CODES, SYNTH, make_config, tiny_tokenizer


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """An uninterrupted single-task, single-worker run: what every other way of running must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "codes"
    result = preprocess(make_config(data, out))
    return SimpleNamespace(out=out, result=result, files=snapshot(out))


def snapshot(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def shard_paths(out: Path) -> list[Path]:
    return sorted(out.glob("train-*.tar"))


def test_end_to_end_counts_metadata_verify_and_stats(data, reference):
    out, result = reference.out, reference.result
    assert [p.name for p in shard_paths(out)] == [f"train-{i:06d}.tar" for i in range(4)]
    assert result["clips"] == 14 and result["shards_written"] == 4 and result["skipped_videos"] == 1
    assert result["missing_videos"] == 0
    assert result["clips_per_s"] > 0 and result["merged"]["clips"] == 14

    info = json.loads((out / "dataset.json").read_text())
    assert info["format_version"] == 1 and info["complete"] is True
    assert info["tokenizer_sha256"] == tokenizer_sha256(data.tokenizer)
    assert info["codebook_size"] == N_CODES and info["grid"] == GRID
    assert info["clip"] == dataclasses.asdict(CLIP) and info["split"] == "train" and info["prefix"] == "train"
    assert info["counts"] == {"videos_listed": 8, "videos": 7, "clips": 14, "shards": 4, "skipped_videos": 1,
                              "bytes": sum(p.stat().st_size for p in shard_paths(out))}
    assert info["skipped_videos"] == [{"video_id": "broken", "source": "broken.mp4", "why": "unreadable"}]
    assert info["missing_videos"] == []

    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert len(manifest) == 14
    # The broken video sorts first, so shard 0 holds the first synthetic train video's 2 clips.
    first_id = video_id(split_indices(SYNTH)[0][0])
    assert manifest[1] == {"shard": "train-000000.tar", "key": "train-000000-000001", "index": 1,
                           "video_id": first_id, "split": "train", "start": 4, "stride": 1, "fps": 8.0,
                           "source": f"{first_id}.mp4", "grid_t": 2, "grid_h": 4, "grid_w": 4}
    shards = pq.read_table(out / "shards.parquet").to_pylist()
    assert [s["num_samples"] for s in shards] == [2, 4, 4, 4]
    assert [s["bytes"] for s in shards] == [p.stat().st_size for p in shard_paths(out)]

    report = verify_dataset(out)
    assert report.ok and report.shards_checked == 4 and report.samples_checked == 14, report.lines()
    stats = dataset_stats(out)
    assert (stats["videos"], stats["clips"], stats["shards"], stats["grid"]) == (7, 14, 4, GRID)
    assert stats["per_split"] == {"train": {"videos": 7, "clips": 14}}


def test_shards_hold_exactly_the_tokenizer_codes(data, reference):
    model = load_tokenizer(data.tokenizer).eval()
    expected = {}
    for clip in iter_clips(list_videos(data.videos, "train"), CLIP):
        with torch.no_grad():
            expected[(clip["video_id"], clip["start"])] = model.encode(clip["video"][None])[0].numpy()
    found = {}
    for path in shard_paths(reference.out):
        for key, codes, meta in read_shard(path):
            assert codes.dtype == np.int16 and list(codes.shape) == GRID
            assert meta["source"] == f"{meta['video_id']}.mp4" and meta["split"] == "train"
            found[(meta["video_id"], meta["start"])] = codes
    assert sorted(found) == sorted(expected)
    for clip_id, codes in found.items():
        np.testing.assert_array_equal(codes, expected[clip_id], err_msg=str(clip_id))


def test_rerun_rewrites_only_the_missing_shard(data, reference, tmp_path):
    out = tmp_path / "codes"
    shutil.copytree(reference.out, out)
    (out / "train-000002.tar").unlink()
    # What a killed run leaves: a half-written shard and manifest part under their temporary names.
    leftovers = [out / ".train-000002.tmp-99999.tar", out / "manifest-parts" / ".train-000002.tmp-99999.parquet"]
    for leftover in leftovers:
        leftover.write_bytes(b"partial")
    kept = {p.name: p.stat().st_mtime_ns for p in shard_paths(out)}

    result = preprocess(make_config(data, out))

    assert (result["shards_written"], result["shards_already_done"], result["clips"]) == (1, 3, 4)
    assert {p.name: p.stat().st_mtime_ns for p in shard_paths(out) if p.name in kept} == kept
    assert not any(p.exists() for p in leftovers)
    assert snapshot(out) == reference.files


def test_two_tasks_then_merge_equal_one_task(data, reference, tmp_path):
    out = tmp_path / "codes"
    first = preprocess(make_config(data, out, task_index=0, num_tasks=2))
    assert first["shards_written"] == 2 and first["merged"] is None
    assert sorted(p.name for p in shard_paths(out)) == ["train-000000.tar", "train-000002.tar"]
    with pytest.raises(DatasetError, match="2 of 4 shards are not finished .*train-000001.tar, train-000003.tar"):
        merge_manifest(out)

    second = preprocess(make_config(data, out, task_index=1, num_tasks=2))
    assert second["shards_written"] == 2 and second["merged"]["clips"] == 14   # the last task merges
    assert merge_manifest(out) == second["merged"]
    assert snapshot(out) == reference.files


def test_two_workers_equal_one(data, reference, tmp_path, monkeypatch):
    def not_here(*args):
        raise AssertionError("with workers=2 the shards must be made in the worker processes")

    monkeypatch.setattr(ShardMaker, "make", not_here)   # spawned workers import the real method
    out = tmp_path / "codes"
    result = preprocess(make_config(data, out, workers=2))
    assert result["shards_written"] == 4 and result["clips"] == 14
    assert snapshot(out) == reference.files


def test_a_worker_error_stops_the_run(data, tmp_path):
    out = tmp_path / "codes"
    out.mkdir()
    (out / "manifest-parts").write_text("a file where the parts folder belongs")
    with pytest.raises(FileExistsError):
        preprocess(make_config(data, out, workers=2))
    assert not list(out.glob("*.tmp*"))
    assert not (out / "manifest.parquet").exists()   # a failed run never publishes a merged manifest


def test_throughput_benchmark_quick_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    saved = preprocess_throughput.main(["--quick", "--json", str(path)])
    assert json.loads(path.read_text()) == saved
    [returned] = saved["runs"]   # --quick: one thread count, one table
    assert returned["clips"] == 8 and returned["size"] == "quick" and returned["threads"] == 1
    for rate in ("decode_clips_per_s", "encode_clips_per_s", "preprocess_clips_per_s"):
        assert returned[rate] > 0
    assert "preprocess end to end" in capsys.readouterr().out


def _existing_dataset(reference, tmp_path) -> Path:
    out = tmp_path / "existing"
    out.mkdir()
    shutil.copy(reference.out / "dataset.json", out / "dataset.json")
    return out


def _other_tokenizer(tmp_path) -> Path:
    path = tmp_path / "other.pt"
    save_tokenizer(tiny_tokenizer(seed=1), path)
    return path


def _empty_split(tmp_path) -> Path:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "train.txt").write_text("")
    return tmp_path / "empty"


def _listing_a_missing_video(tmp_path) -> Path:
    (tmp_path / "listed").mkdir()
    (tmp_path / "listed" / "train.txt").write_text("gone.mp4\n")
    return tmp_path / "listed"


BAD_INPUTS = {
    "missing input dir": (lambda r, t: {"input_dir": str(t / "nowhere")}, r"input dir '.*nowhere' does not exist"),
    "missing tokenizer": (lambda r, t: {"tokenizer": str(t / "none.pt")},
                          r"tokenizer checkpoint '.*none.pt' does not exist"),
    "no videos": (lambda r, t: {"input_dir": str(_empty_split(t))}, r"no videos in split 'train' of '.*empty'"),
    "missing listed video": (lambda r, t: {"input_dir": str(_listing_a_missing_video(t))},
                             r"video 'gone.mp4' listed in '.*listed/train.txt' does not exist; fix the list, or pass "
                             r"--skip-missing"),
    "resolution": (lambda r, t: {"clip": ClipConfig(sequence_length=4, resolution=18)},
                   r"clip resolution 18 is not divisible by the tokenizer's spatial downsampling 4x4"),
    "sequence length": (lambda r, t: {"clip": ClipConfig(sequence_length=3, resolution=16)},
                        r"clip sequence length 3 is not divisible by the tokenizer's temporal downsampling 2"),
    "other tokenizer": (lambda r, t: {"out_dir": str(_existing_dataset(r, t)), "tokenizer": str(_other_tokenizer(t))},
                        r"holds a dataset made with different settings: tokenizer_sha256 \(saved \w+\.\.\., now \w+"),
    "other clip settings": (lambda r, t: {"out_dir": str(_existing_dataset(r, t)),
                                          "clip": dataclasses.replace(CLIP, resolution=32)},
                            r"different settings: grid \(saved \[2, 4, 4\], now \[2, 8, 8\]\), "
                            r"clip.resolution \(saved 16, now 32\); use another output dir or the same settings$"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_a_one_line_user_error(case, data, reference, tmp_path):
    overrides, pattern = BAD_INPUTS[case]
    kwargs = overrides(reference, tmp_path)
    out = Path(kwargs.get("out_dir", tmp_path / "out"))
    before = sorted(p.name for p in out.iterdir()) if out.exists() else None
    with pytest.raises(UserError, match=pattern) as caught:
        preprocess(make_config(data, tmp_path / "out", **kwargs))
    assert "\n" not in str(caught.value)
    # refused before anything was written: a fresh folder is not created, an existing one is untouched
    assert (sorted(p.name for p in out.iterdir()) if out.exists() else None) == before
    if before is not None:
        assert (out / "dataset.json").read_bytes() == (reference.out / "dataset.json").read_bytes()


@pytest.mark.parametrize("overrides, pattern", [
    ({"task_index": 2, "num_tasks": 2}, r"'task_index' must be in \[0, num_tasks=2\), got 2"),
    ({"prefix": "a.b"}, r"'prefix' must use only letters"),
    ({"workers": 0}, r"'workers' must be positive"),
])
def test_bad_config_values(overrides, pattern, data, tmp_path):
    with pytest.raises(ConfigError, match=pattern):
        make_config(data, tmp_path, **overrides)


def test_resume_refuses_a_changed_video_list(data, reference, tmp_path):
    videos = tmp_path / "videos"
    shutil.copytree(data.videos, videos)
    (videos / "train.txt").write_text("".join(line + "\n" for line in (videos / "train.txt").read_text().split()[:-1]))
    out = tmp_path / "codes"
    shutil.copytree(reference.out, out)
    with pytest.raises(DatasetError, match=r"num_videos \(saved 8, now 7\), videos_sha256 \(saved \w+\.\.\."):
        preprocess(make_config(data, out, input_dir=str(videos)))
    assert os.listdir(out) == os.listdir(reference.out)


def _cli_args(videos, out, tokenizer, *extra) -> list[str]:
    # The clip settings of CLIP (the CLI's clip stride defaults to the clip length, 4).
    return ["preprocess", str(videos), "--out", str(out), "--tokenizer", str(tokenizer), "--sequence-length", "4",
            "--resolution", "16", "--videos-per-shard", "2", "--no-progress", *extra]


def _unusable_videos(folder: Path) -> Path:
    """3 videos too short for a clip of 4 frames and 1 unreadable one, all listed for training."""
    folder.mkdir()
    for name in ("a", "b", "c"):
        write_mp4(np.zeros((2, 32, 32, 3), np.uint8), folder / f"{name}.mp4", fps=8)
    (folder / "d.mp4").write_bytes(b"not a video")
    (folder / "train.txt").write_text("a.mp4\nb.mp4\nc.mp4\nd.mp4\n")
    (folder / "test.txt").write_text("")
    return folder


def test_no_usable_clips_is_an_error_and_nothing_is_complete(data, tmp_path, capsys):
    videos, out = _unusable_videos(tmp_path / "videos"), tmp_path / "codes"
    expected = (f"split 'train' of '{videos.resolve()}' has no usable clips: 4 videos tried, 3 too short for 4 "
                "frames, 1 unreadable; fix the videos")
    capsys.readouterr()
    assert main(_cli_args(videos, out, data.tokenizer)) != 0
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mebt: error:")]
    assert len(errors) == 1 and expected in errors[0]
    assert json.loads((out / "dataset.json").read_text())["complete"] is False
    assert not (out / "manifest.parquet").exists() and not (out / "shards.parquet").exists()
    with pytest.raises(DatasetError, match="no usable clips: 4 videos tried"):   # `mebt data merge` agrees
        merge_manifest(out)

    # In a SLURM array only the task that merges knows the total: the others finish normally.
    out = tmp_path / "codes_two_tasks"
    assert preprocess(make_config(data, out, input_dir=str(videos), task_index=1, num_tasks=2))["merged"] is None
    with pytest.raises(DatasetError, match="no usable clips: 4 videos tried, 3 too short for 4 frames, 1 unreadable"):
        preprocess(make_config(data, out, input_dir=str(videos), task_index=0, num_tasks=2))
    assert json.loads((out / "dataset.json").read_text())["complete"] is False


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_a_task_whose_own_slice_has_no_clips_is_fine(order, data, tmp_path):
    # One video per shard: shard 0 (task 0) holds the short video, shard 1 (task 1) the 2 clips of the other.
    videos = tmp_path / "videos"
    videos.mkdir()
    write_mp4(np.zeros((2, 32, 32, 3), np.uint8), videos / "a.mp4", fps=8)
    write_mp4(np.zeros((8, 32, 32, 3), np.uint8), videos / "b.mp4", fps=8)
    (videos / "train.txt").write_text("a.mp4\nb.mp4\n")
    results = {task: preprocess(make_config(data, tmp_path / "codes", input_dir=str(videos), videos_per_shard=1,
                                            task_index=task, num_tasks=2)) for task in order}
    assert results[0]["clips"] == 0 and results[1]["clips"] == 2
    assert results[order[0]]["merged"] is None and results[order[1]]["merged"]["clips"] == 2


def test_skip_missing_leaves_out_and_counts_missing_listed_videos(data, reference, tmp_path, capsys, caplog):
    videos, out = tmp_path / "videos", tmp_path / "codes"
    shutil.copytree(data.videos, videos)
    with open(videos / "train.txt", "a") as f:
        f.write("gone.mp4\n")
    capsys.readouterr()
    assert main(_cli_args(videos, out, data.tokenizer, "--skip-missing")) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["missing_videos"] == 1 and result["clips"] == 14
    assert "skipping video 'gone.mp4' listed in" in caplog.text
    assert json.loads((out / "dataset.json").read_text())["missing_videos"] == ["gone.mp4"]
    assert pq.read_table(out / "manifest.parquet").equals(pq.read_table(reference.out / "manifest.parquet"))


def test_gif_files_are_videos_only_when_asked(data, tmp_path, capsys):
    videos = tmp_path / "videos"   # no split files: every video under the folder
    videos.mkdir()
    write_gif(np.zeros((4, 32, 32, 3), np.uint8), videos / "preview.gif")
    with pytest.raises(PreprocessError, match="no videos in split 'train'"):
        preprocess(make_config(data, tmp_path / "without", input_dir=str(videos)))
    capsys.readouterr()
    assert main(_cli_args(videos, tmp_path / "with", data.tokenizer, "--include-gif")) == 0
    assert json.loads(capsys.readouterr().out)["clips"] == 1
