import json
import os

import numpy as np
import pytest

import data_pipeline.synthetic_videos as synthetic_videos
from data_pipeline.synthetic_videos import SynthConfig, render_video, split_indices, video_id, write_synthetic_dataset
from data_pipeline.video import read_video
from mebt.errors import ConfigError, UserError

SMALL = dict(num_videos=5, frames=12, resolution=64, fps=6, test_fraction=0.4)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / mse))


def test_render_is_deterministic_per_seed_and_index():
    cfg = SynthConfig(frames=8, resolution=32)
    video = render_video(3, cfg)
    assert video.shape == (8, 32, 32, 3) and video.dtype == np.uint8
    assert np.array_equal(video, render_video(3, cfg))
    assert not np.array_equal(video, render_video(4, cfg))
    assert not np.array_equal(video, render_video(3, SynthConfig(frames=8, resolution=32, seed=1)))


def test_shapes_are_visible_and_move():
    cfg = SynthConfig(frames=6, resolution=64)
    for index in range(6):
        video = render_video(index, cfg).astype(np.int16)
        # Shapes are bright against a dark background: some pixels stand far from the frame's median color.
        assert (np.abs(video[0] - np.median(video[0], axis=(0, 1))).max(axis=-1) > 60).sum() > 20
        changed = np.abs(np.diff(video, axis=0)).max(axis=-1) > 30
        assert changed.reshape(len(video) - 1, -1).sum(axis=1).min() > 4, f"video {index} has a still frame"


@pytest.mark.parametrize("key, value", [("resolution", 33), ("resolution", 8), ("frames", 0),
                                        ("test_fraction", 1.0), ("max_shapes", 0)])
def test_config_rejects_bad_values(key, value):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        SynthConfig(**{key: value})


def test_palette_restricts_shapes_and_plain_backgrounds_to_its_colors():
    cfg = SynthConfig(num_videos=12, frames=6, resolution=32, palette=3)
    allowed = np.round([synthetic_videos.palette_color(i, 3, bright) for i in range(3) for bright in (True, False)])
    seen = set()
    for index in range(cfg.num_videos):
        video = render_video(index, cfg).reshape(-1, 3).astype(np.float64)
        # Anti-aliased edges blend two colors; everything else is exactly one of the palette's six colors.
        exact = (np.abs(video[:, None] - allowed[None]).max(-1) <= 0.5)
        assert exact.any(1).mean() > 0.75
        seen.update(np.flatnonzero(exact.any(0)).tolist())
        assert not np.array_equal(video, render_video(index, SynthConfig(frames=6, resolution=32)).reshape(-1, 3))
    assert len(seen) >= 5   # shapes and backgrounds of several palette colors across the videos


def test_written_mp4_matches_render(tmp_path):
    cfg = SynthConfig(**SMALL)
    summary = write_synthetic_dataset(tmp_path, cfg, progress=False)
    assert summary["written"] == 5 and summary["skipped"] == 0
    scores = []
    for index in range(cfg.num_videos):
        frames, fps = read_video(tmp_path / f"synth_{index:06d}.mp4")
        assert frames.shape == (12, 64, 64, 3) and fps == 6.0
        scores.append(psnr(frames, render_video(index, cfg)))
    assert min(scores) > 30.0, scores


def test_splits_partition_the_videos(tmp_path):
    cfg = SynthConfig(**SMALL)
    write_synthetic_dataset(tmp_path, cfg, progress=False)
    train = (tmp_path / "train.txt").read_text().split()
    test = (tmp_path / "test.txt").read_text().split()
    assert len(test) == 2 and not set(train) & set(test)
    assert sorted(train + test) == sorted(p.name for p in tmp_path.glob("*.mp4"))
    assert test == [f"{video_id(i)}.mp4" for i in split_indices(cfg)[1]]
    meta = json.loads((tmp_path / "synth.json").read_text())
    assert meta["config"]["resolution"] == 64 and meta["train"] == 3


def test_rerun_skips_complete_files_and_redoes_partial_ones(tmp_path):
    cfg = SynthConfig(**SMALL)
    write_synthetic_dataset(tmp_path, cfg, progress=False)
    mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.mp4")}
    # An interrupted run leaves only the temporary file of the video it was encoding.
    (tmp_path / "synth_000002.mp4").unlink()
    (tmp_path / ".synth_000002.tmp-99999.mp4").write_bytes(b"truncated")   # written by a killed process
    summary = write_synthetic_dataset(tmp_path, cfg, progress=False)
    assert summary["written"] == 1 and summary["skipped"] == 4
    assert not (tmp_path / ".synth_000002.tmp-99999.mp4").exists()
    for name, mtime in mtimes.items():
        if name != "synth_000002.mp4":
            assert (tmp_path / name).stat().st_mtime_ns == mtime, name
    frames, _ = read_video(tmp_path / "synth_000002.mp4")
    assert psnr(frames, render_video(2, cfg)) > 30.0


def test_rerun_with_another_render_config_is_refused(tmp_path):
    write_synthetic_dataset(tmp_path, SynthConfig(**SMALL), progress=False)
    with pytest.raises(UserError, match=r"seed \(saved 0, now 1\)"):
        write_synthetic_dataset(tmp_path, SynthConfig(**{**SMALL, "seed": 1}), progress=False)
    # More videos with the same rendering settings extend the data set instead.
    summary = write_synthetic_dataset(tmp_path, SynthConfig(**{**SMALL, "num_videos": 6}), progress=False)
    assert summary["written"] == 1 and len(os.listdir(tmp_path)) == 6 + 3


def test_an_interrupted_first_run_still_refuses_another_config(tmp_path, monkeypatch):
    real = synthetic_videos.render_video

    def crash_after_one(index, cfg):
        if index == 1:
            raise KeyboardInterrupt
        return real(index, cfg)

    monkeypatch.setattr(synthetic_videos, "render_video", crash_after_one)
    with pytest.raises(KeyboardInterrupt):
        write_synthetic_dataset(tmp_path, SynthConfig(**SMALL), progress=False)
    monkeypatch.setattr(synthetic_videos, "render_video", real)
    with pytest.raises(UserError, match=r"another config: resolution \(saved 64, now 32\); use a new output folder$"):
        write_synthetic_dataset(tmp_path, SynthConfig(**{**SMALL, "resolution": 32}), progress=False)
