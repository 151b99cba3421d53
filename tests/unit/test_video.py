import logging

import av
import numpy as np
import pytest
import torch

import data_pipeline.video as video_mod
from data_pipeline.video import (
    ClipConfig,
    VideoClipDataset,
    VideoEntry,
    VideoReadError,
    iter_clips,
    list_videos,
    preprocess_frames,
    read_clip,
    read_video,
)
from mebt.errors import ConfigError, UserError
from mebt.media import write_mp4


def counting_frames(n: int, size: int = 16) -> np.ndarray:
    """Uniform gray frames whose level encodes the frame number, so a decoded frame tells its index."""
    return np.repeat((np.arange(n, dtype=np.uint8) * 4)[:, None, None, None], size * size * 3).reshape(n, size, size, 3)


def frame_index(frames: np.ndarray) -> np.ndarray:
    return np.round(frames.reshape(len(frames), -1).mean(axis=1) / 4).astype(int)


def write_png(path, image: np.ndarray) -> None:
    with av.open(str(path), "w", format="image2") as container:
        stream = container.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = image.shape[1], image.shape[0], "rgb24"
        container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


@pytest.fixture
def video_root(tmp_path):
    """Two good mp4 videos (20 and 12 frames) listed in train.txt."""
    write_mp4(counting_frames(20), tmp_path / "long.mp4", fps=10)
    write_mp4(counting_frames(12), tmp_path / "short.mp4", fps=10)
    (tmp_path / "train.txt").write_text("long.mp4\nshort.mp4\n")
    return tmp_path


def test_read_video_returns_all_frames_and_fps(tmp_path):
    write_mp4(counting_frames(9, size=24), tmp_path / "v.mp4", fps=12)
    frames, fps = read_video(tmp_path / "v.mp4")
    assert frames.shape == (9, 24, 24, 3) and frames.dtype == np.uint8 and fps == 12.0
    assert frame_index(frames).tolist() == list(range(9))


def test_read_clip_seeks_to_the_exact_frames(tmp_path):
    # Keyframes every 5 frames: starts before, on and after a keyframe all need the seek to land right.
    write_mp4(counting_frames(40), tmp_path / "v.mp4", fps=10, keyframe_interval=5)
    for start in (0, 3, 5, 6, 17, 30):
        clip, _ = read_clip(tmp_path / "v.mp4", start, count=4, stride=3)
        assert frame_index(clip).tolist() == list(range(start, start + 12, 3)), start
    with pytest.raises(VideoReadError, match="has 3 decodable frames from frame 34, need 4"):
        read_clip(tmp_path / "v.mp4", 34, count=4, stride=2)


def test_unreadable_file_names_the_file(tmp_path):
    (tmp_path / "broken.mp4").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(VideoReadError, match=r"cannot read video '.*broken\.mp4': not a decodable video"):
        read_video(tmp_path / "broken.mp4")
    with pytest.raises(VideoReadError, match="no such file"):
        read_video(tmp_path / "missing.mp4")


def test_frame_folder_dataset_layout(tmp_path):
    # sky-timelapse style: a folder per video holding VIDEOID_FRAMENUM images, listed in the split files.
    folder = tmp_path / "clips" / "vidA"
    folder.mkdir(parents=True)
    frames = counting_frames(12, size=8)
    for i, frame in enumerate(frames):
        write_png(folder / f"vidA_{i + 1}.png", frame)  # unpadded numbers: vidA_10 must follow vidA_9
    (tmp_path / "train.txt").write_text("clips/vidA\n")
    (tmp_path / "test.txt").write_text("")
    entries = list_videos(tmp_path, "train")
    assert [(e.video_id, e.kind) for e in entries] == [("clips/vidA", "frames")]
    decoded, _ = read_video(entries[0].path)
    assert np.array_equal(decoded, frames)  # PNG is lossless
    clip, _ = read_clip(entries[0].path, 2, count=3, stride=4)
    assert np.array_equal(clip, frames[2:11:4])
    assert list_videos(tmp_path, "test") == []


def test_list_videos_without_split_files(tmp_path):
    write_mp4(counting_frames(2), tmp_path / "a.mp4", fps=5)
    (tmp_path / "sub").mkdir()
    write_mp4(counting_frames(2), tmp_path / "sub" / "b.mp4", fps=5)
    (tmp_path / ".c.mp4.partial").write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("not a video")
    assert [e.video_id for e in list_videos(tmp_path, "train")] == ["a", "sub/b"]


def test_scans_take_gif_only_when_asked(tmp_path):
    # A .gif next to the videos is usually a preview; frame folders are videos.
    write_mp4(counting_frames(2), tmp_path / "a.mp4", fps=5)
    (tmp_path / "preview.gif").write_bytes(b"GIF89a")
    (tmp_path / "frames").mkdir()
    write_png(tmp_path / "frames" / "frames_1.png", counting_frames(1, size=8)[0])
    assert [(e.video_id, e.kind) for e in list_videos(tmp_path, "train")] == [("a", "file"), ("frames", "frames")]
    assert [e.video_id for e in list_videos(tmp_path, "train", include_gif=True)] == ["a", "frames", "preview"]
    (tmp_path / "train").mkdir()   # a split folder is scanned the same way
    (tmp_path / "preview.gif").rename(tmp_path / "train" / "preview.gif")
    assert list_videos(tmp_path, "train") == []
    assert [e.video_id for e in list_videos(tmp_path, "train", include_gif=True)] == ["train/preview"]


def test_a_missing_listed_video_is_an_error_unless_skipped(video_root, caplog):
    (video_root / "train.txt").write_text("long.mp4\ngone.mp4\nshort.mp4\nlost.mp4\n")
    with pytest.raises(UserError, match=r"^video 'gone.mp4' listed in '.*train.txt' does not exist \(and 1 more "
                                        r"listed there\); fix the list, or pass --skip-missing") as caught:
        list_videos(video_root, "train")
    assert "\n" not in str(caught.value)
    missing = []
    with caplog.at_level(logging.WARNING, logger="data_pipeline.video"):
        entries = list_videos(video_root, "train", missing=missing)
    assert [e.video_id for e in entries] == ["long", "short"] and missing == ["gone.mp4", "lost.mp4"]
    assert "skipping video 'gone.mp4' listed in" in caplog.text and "'lost.mp4'" in caplog.text


def test_without_split_files_the_overlap_is_a_warning(tmp_path, caplog):
    write_mp4(counting_frames(2), tmp_path / "a.mp4", fps=5)
    with caplog.at_level(logging.WARNING, logger="data_pipeline.video"):
        assert list_videos(tmp_path, "train") == list_videos(tmp_path, "test")
    assert caplog.text.count("train and test overlap; add train.txt and test.txt (or train/ and test/ folders)") == 2
    caplog.clear()
    (tmp_path / "train.txt").write_text("a.mp4\n")
    (tmp_path / "test.txt").write_text("")
    with caplog.at_level(logging.WARNING, logger="data_pipeline.video"):
        list_videos(tmp_path, "train")
    assert caplog.text == ""


def test_upsampling_warns_once_per_video_with_the_factor(tmp_path, caplog):
    write_mp4(np.zeros((12, 18, 32, 3), np.uint8), tmp_path / "small.mp4", fps=10)
    write_mp4(counting_frames(12, size=64), tmp_path / "big.mp4", fps=10)
    (tmp_path / "train.txt").write_text("small.mp4\nbig.mp4\n")
    cfg = ClipConfig(sequence_length=4, resolution=32, starts="all", all_stride=4)   # 3 clips per video
    expected = "small.mp4' is 32x18: its short side 18 is upsampled 1.78x to 32"
    with caplog.at_level(logging.WARNING, logger="data_pipeline.video"):
        assert len(list(iter_clips(list_videos(tmp_path, "train"), cfg))) == 6
    assert caplog.text.count("upsampled") == 1 and expected in caplog.text
    caplog.clear()
    ds = VideoClipDataset(tmp_path, "train", cfg)
    with caplog.at_level(logging.WARNING, logger="data_pipeline.video"):
        assert [ds[i]["video"].shape[-1] for i in range(len(ds))] == [32] * 6
    assert caplog.text.count("upsampled") == 1 and expected in caplog.text


def test_list_videos_split_folders(tmp_path):
    (tmp_path / "train").mkdir()
    write_mp4(counting_frames(2), tmp_path / "train" / "a.mp4", fps=5)
    assert [e.video_id for e in list_videos(tmp_path, "train")] == ["train/a"]
    with pytest.raises(UserError, match="no 'test.txt' or 'test/'"):
        list_videos(tmp_path, "test")


def test_preprocess_center_crops_without_resampling():
    # Short side already at the resolution: the output is exactly the central columns.
    frames = np.zeros((2, 32, 64, 3), np.uint8)
    frames[..., 0] = np.arange(64, dtype=np.uint8) * 3
    out = preprocess_frames(frames, 32)
    assert out.shape == (3, 2, 32, 32) and out.dtype == torch.float32
    expected = torch.arange(16, 48).float() * 3 / 255 - 0.5
    assert torch.allclose(out[0, 1, 5], expected)
    assert torch.all(out[1:] == -0.5)


@pytest.mark.parametrize("shape", [(40, 80), (80, 40)])
def test_preprocess_resizes_the_short_side_then_crops(shape):
    # Red | green | blue bands across the long side; the middle band becomes the whole square after
    # the 2x downscale and the center crop (only the crop's border pixels may blend in a neighbor band).
    h, w = shape
    frames = np.zeros((3, h, w, 3), np.uint8)
    long_axis = 2 if w > h else 1
    for channel, (lo, hi) in enumerate([(0, 20), (20, 60), (60, 80)]):
        index = [slice(None)] * 4
        index[long_axis], index[3] = slice(lo, hi), channel
        frames[tuple(index)] = 255
    out = preprocess_frames(frames, 20)
    assert out.shape == (3, 3, 20, 20)
    assert out.min() >= -0.5 and out.max() <= 0.5
    inner = out[:, :, 1:-1, 1:-1]
    assert torch.allclose(inner[1], torch.full_like(inner[1], 0.5), atol=1e-4)
    assert torch.allclose(inner[[0, 2]], torch.full_like(inner[[0, 2]], -0.5), atol=1e-4)


@pytest.mark.parametrize("key, value", [("sequence_length", 0), ("frame_stride", 0), ("all_stride", 0), ("starts", "some")])
def test_clip_config_rejects_bad_values(key, value):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        ClipConfig(**{key: value})


def test_all_starts_cover_every_clip_with_stride(video_root):
    cfg = ClipConfig(sequence_length=4, frame_stride=2, resolution=8, starts="all", all_stride=3)
    ds = VideoClipDataset(video_root, "train", cfg)
    # A clip spans 7 frames: 20 frames -> starts 0,3,...,12 (5 clips); 12 frames -> starts 0,3 (2 clips).
    assert len(ds) == 7
    items = [ds[i] for i in range(len(ds))]
    assert [(it["video_id"], it["start"]) for it in items] == \
        [("long", s) for s in (0, 3, 6, 9, 12)] + [("short", 0), ("short", 3)]
    item = items[3]
    assert item["video"].shape == (3, 4, 8, 8) and item["stride"] == 2 and item["fps"] == 10.0
    frames, _ = read_video(video_root / "long.mp4")
    assert torch.equal(item["video"], preprocess_frames(frames[9:16:2], 8))
    with pytest.raises(IndexError):
        ds[7]


def test_random_starts_are_deterministic(video_root):
    cfg = ClipConfig(sequence_length=3, resolution=8)

    def starts_per_epoch(ds, epochs=8):
        result = []
        for epoch in range(epochs):
            ds.set_epoch(epoch)
            result.append(tuple(ds[i]["start"] for i in range(len(ds))))
        return result

    ds = VideoClipDataset(video_root, "train", cfg, seed=5)
    assert len(ds) == 2
    runs = starts_per_epoch(ds)
    assert runs == starts_per_epoch(VideoClipDataset(video_root, "train", cfg, seed=5))
    assert len(set(runs)) > 1  # new clips each epoch
    assert runs != starts_per_epoch(VideoClipDataset(video_root, "train", cfg, seed=6))
    clip = ds[0]
    frames, _ = read_video(video_root / "long.mp4")
    assert torch.equal(clip["video"], preprocess_frames(frames[clip["start"]:clip["start"] + 3], 8))


def test_bad_videos_are_skipped_counted_and_named(video_root, caplog):
    (video_root / "corrupt.mp4").write_bytes(bytes(range(256)) * 40)
    write_mp4(counting_frames(3), video_root / "tiny.mp4", fps=10)
    (video_root / "train.txt").write_text("corrupt.mp4\nlong.mp4\ntiny.mp4\nshort.mp4\n")
    cfg = ClipConfig(sequence_length=5, resolution=8, starts="all", all_stride=4)
    with caplog.at_level(logging.WARNING, logger="data_pipeline.video"):
        ds = VideoClipDataset(video_root, "train", cfg)
    assert sorted((s.path.rsplit("/", 1)[-1], s.why) for s in ds.skipped) == \
        [("corrupt.mp4", "unreadable"), ("tiny.mp4", "too short for 5 frames")]
    assert "corrupt.mp4" in caplog.text and "tiny.mp4" in caplog.text and "a clip needs 5" in caplog.text
    assert len(ds) == 4 + 2 and {ds[i]["video_id"] for i in range(len(ds))} == {"long", "short"}


def test_all_bad_videos_raise(tmp_path):
    (tmp_path / "corrupt.mp4").write_bytes(b"not a video")
    write_mp4(counting_frames(2), tmp_path / "tiny.mp4", fps=10)
    with pytest.raises(UserError, match=r"none of the 2 videos of split 'train' .*\(1 unreadable, 1 too short for 4 "):
        VideoClipDataset(tmp_path, "train", ClipConfig(sequence_length=4))


def test_decode_failure_at_access_falls_back_to_another_video(video_root, monkeypatch):
    real_read_clip = video_mod.read_clip

    def failing_read_clip(path, *args, **kwargs):
        if path.name == "long.mp4":
            raise VideoReadError(path, "corrupt packet")
        return real_read_clip(path, *args, **kwargs)

    monkeypatch.setattr(video_mod, "read_clip", failing_read_clip)
    ds = VideoClipDataset(video_root, "train", ClipConfig(sequence_length=3, resolution=8))
    assert ds[0]["video_id"] == "short" and ds[1]["video_id"] == "short"
    assert len(ds.skipped) == 1 and ds.skipped[0].path.endswith("long.mp4")


def test_iter_clips_matches_the_all_starts_dataset(video_root):
    (video_root / "corrupt.mp4").write_bytes(b"not a video")
    cfg = ClipConfig(sequence_length=4, frame_stride=2, resolution=8, starts="all", all_stride=3)
    entries = list_videos(video_root, "train") + [VideoEntry("corrupt", video_root / "corrupt.mp4", "file")]
    skipped = []
    streamed = list(iter_clips(entries, cfg, skipped))
    ds = VideoClipDataset(video_root, "train", cfg)
    assert len(streamed) == len(ds) and len(skipped) == 1 and skipped[0].path.endswith("corrupt.mp4")
    for got, want in zip(streamed, (ds[i] for i in range(len(ds)))):
        assert (got["video_id"], got["start"], got["fps"]) == (want["video_id"], want["start"], want["fps"])
        assert torch.allclose(got["video"], want["video"], atol=1e-5)
