"""Video input for tokenizer training and preprocessing: decoding, clip sampling and TATS-style preprocessing.

A video is either a file PyAV can decode (mp4, webm, avi, mkv, ...) or a folder of frames named
``VIDEOID_FRAMENUM.png|jpg`` (the sky-timelapse / taichi layout TATS and MeBT use). A data set root lists
its videos, relative to the root, one per line in ``train.txt`` / ``test.txt``; without split files the
``train/`` and ``test/`` sub-folders, or else every video under the root (both splits then hold every
video: a warning says so), are used. Scanning a folder takes ``.gif`` files only when asked: they are
usually previews next to the data, not data.

Clips are returned as float tensors [3, T, res, res] in [-0.5, 0.5] (uint8 / 255 - 0.5), the input
convention of the TATS VQGAN.
"""
from __future__ import annotations

import functools
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Literal, NamedTuple

import av
import numpy as np
import torch
import torch.nn.functional as F

from mebt.errors import ConfigError, UserError

log = logging.getLogger(__name__)

# Files read_clip decodes. A data set scan takes GIF_EXTENSIONS only with include_gif (see list_videos).
VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".m4v", ".gif")
GIF_EXTENSIONS = (".gif",)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
# Frame folders carry no frame rate; this is only reported in the clip metadata, never used for sampling.
FRAME_FOLDER_FPS = 25.0


class VideoReadError(UserError):
    """A video that cannot be decoded; the message names the file and the reason."""

    def __init__(self, path, reason: str):
        super().__init__(f"cannot read video '{path}': {reason}")
        self.path = str(path)


class SkippedVideo(NamedTuple):
    path: str
    why: str                         # "unreadable" or "too short for N frames": counted per reason in summaries


def describe_skips(skipped: Iterable[SkippedVideo]) -> str:
    """'3 too short for 16 frames, 1 unreadable': the skipped videos counted by reason."""
    counts = Counter(s.why for s in skipped)
    return ", ".join(f"{n} {why}" for why, n in counts.most_common())


class VideoEntry(NamedTuple):
    video_id: str                    # path relative to the data set root, without the file extension
    path: Path
    kind: Literal["file", "frames"]


@dataclass
class ClipConfig:
    sequence_length: int = 16
    frame_stride: int = 1            # take every n-th frame of the video
    resolution: int = 128
    starts: Literal["random", "all"] = "random"
    all_stride: int = field(default=1, metadata={"flag": "clip_stride"})   # with starts='all': frames between clip starts

    def __post_init__(self):
        for key in ("sequence_length", "frame_stride", "resolution", "all_stride"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key '{key}' must be positive, got {getattr(self, key)}")
        if self.starts not in ("random", "all"):
            raise ConfigError(f"config key 'starts' must be 'random' or 'all', got {self.starts!r}")

    @property
    def span(self) -> int:
        """Number of consecutive source frames one clip covers."""
        return (self.sequence_length - 1) * self.frame_stride + 1

    def clip_starts(self, n_frames: int) -> range:
        """Every start (spaced by ``all_stride``) whose clip fits in a video of ``n_frames`` frames."""
        return range(0, max(n_frames - self.span + 1, 0), self.all_stride)


# ---------------------------------------------------------------------------------------------- decoding

def _frame_number(path: Path) -> tuple[int, str]:
    match = re.search(r"(\d+)$", path.stem)  # VIDEOID_FRAMENUM: sort numerically, so frame 10 follows frame 9
    return (int(match.group(1)) if match else -1, path.name)


def frame_files(folder: Path) -> list[Path]:
    """Image files of a frame folder in frame order."""
    files = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")]
    return sorted(files, key=_frame_number)


def _decode_image(path: Path) -> np.ndarray:
    try:
        with av.open(str(path)) as container:
            return next(container.decode(video=0)).to_ndarray(format="rgb24")
    except (av.FFmpegError, OSError, StopIteration) as e:
        raise VideoReadError(path.parent, f"frame '{path.name}' is not a readable image ({e or 'no image data'})") from None


def _stack(frames: list[np.ndarray], path) -> np.ndarray:
    if len({f.shape for f in frames}) > 1:
        raise VideoReadError(path, f"frames have different sizes {sorted({f.shape[:2] for f in frames})}")
    return np.stack(frames)


def _open_stream(path: Path):
    """Open a video file; returns (container, first video stream). The caller closes the container."""
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as e:
        raise VideoReadError(path, f"not a decodable video ({e})") from None
    if not container.streams.video:
        container.close()
        raise VideoReadError(path, "the file has no video stream")
    return container, container.streams.video[0]


def _stream_fps(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate
    return float(rate) if rate else FRAME_FOLDER_FPS


def _frame_times(path: Path) -> tuple[int, tuple[int, ...] | None]:
    """(frame count, sorted packet timestamps or None when some are missing) of a video file.

    Frame i is shown at the i-th smallest packet timestamp. Cached per process because every clip of a
    video needs the table; keyed by size and mtime too, so a rewritten file is read again.
    """
    stat = path.stat()
    return _frame_times_cached(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _frame_times_cached(path: Path, size: int, mtime_ns: int) -> tuple[int, tuple[int, ...] | None]:
    # Demuxing reads the file without decoding pixels: far cheaper than decoding.
    container, stream = _open_stream(path)
    with container:
        try:
            pts = [p.pts for p in container.demux(stream) if p.size > 0]
        except av.FFmpegError as e:
            raise VideoReadError(path, f"corrupt stream ({e})") from None
    return len(pts), None if None in pts else tuple(sorted(pts))


def probe_video(path) -> tuple[int, float]:
    """(number of frames, fps) without decoding pixels."""
    path = Path(path)
    if path.is_dir():
        return len(frame_files(path)), FRAME_FOLDER_FPS
    if not path.is_file():
        raise VideoReadError(path, "no such file or folder")
    container, stream = _open_stream(path)
    with container:
        fps = _stream_fps(stream)
    return _frame_times(path)[0], fps


def _decode_file(path: Path, start: int, stop: int | None) -> tuple[list[np.ndarray], float]:
    """Frames [start, stop) of a video file; seeks to the keyframe before ``start`` when timestamps allow."""
    first_pts = None
    if start > 0:
        n_frames, times = _frame_times(path)
        if start >= n_frames:
            return [], 0.0
        # Without timestamps (some AVI files) decode from the first frame and drop the frames before ``start``.
        first_pts = times[start] if times is not None else None
    container, stream = _open_stream(path)
    with container:
        fps = _stream_fps(stream)
        try:
            if first_pts is not None:
                container.seek(first_pts, stream=stream, backward=True)
            frames, index = [], 0
            for frame in container.decode(stream):
                if first_pts is not None:
                    if frame.pts is not None and frame.pts < first_pts:
                        continue
                    index, first_pts = start, None  # from here frames are consecutive
                if index >= start:
                    frames.append(frame.to_ndarray(format="rgb24"))
                index += 1
                if stop is not None and index >= stop:
                    break
        except av.FFmpegError as e:
            raise VideoReadError(path, f"decoding failed ({e})") from None
    return frames, fps


def read_clip(path, start: int = 0, count: int | None = None, stride: int = 1) -> tuple[np.ndarray, float]:
    """uint8 [count, H, W, 3] frames ``start, start + stride, ...`` of a video file or frame folder, and its fps.

    Only the frames up to the last requested one are decoded. ``count=None`` reads to the end. Raises
    ``VideoReadError`` when the video is unreadable or has fewer frames than requested.
    """
    path = Path(path)
    stop = None if count is None else start + (count - 1) * stride + 1
    if path.is_dir():
        files = frame_files(path)[start:stop:stride]
        frames, fps = [_decode_image(f) for f in files], FRAME_FOLDER_FPS
    elif path.is_file():
        decoded, fps = _decode_file(path, start, stop)
        frames = decoded[::stride]
    else:
        raise VideoReadError(path, "no such file or folder")
    if not frames or (count is not None and len(frames) < count):
        needed = count if count is not None else 1
        raise VideoReadError(path, f"has {len(frames)} decodable frames from frame {start}, need {needed}")
    return _stack(frames, path), fps


def read_video(path) -> tuple[np.ndarray, float]:
    """All frames of a video file or frame folder as uint8 [T, H, W, 3], and the frame rate."""
    return read_clip(path)


# ----------------------------------------------------------------------------------------- preprocessing

def preprocess_frames(frames: np.ndarray | torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [3, T, res, res] in [-0.5, 0.5], as TATS prepares videos.

    The short side is resized to ``resolution`` (bilinear; anti-aliased when shrinking, like area
    interpolation) and the long side is center-cropped, all frames at once as one batch.
    """
    video = torch.as_tensor(frames).permute(0, 3, 1, 2).float()  # [T, 3, H, W]: frames are the batch
    _, _, h, w = video.shape
    scale = resolution / min(h, w)
    size = (resolution, math.ceil(w * scale)) if h < w else (math.ceil(h * scale), resolution)
    if size != (h, w):
        video = F.interpolate(video, size=size, mode="bilinear", align_corners=False, antialias=scale < 1)
    top, left = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    video = video[:, :, top:top + resolution, left:left + resolution]
    return (video / 255.0 - 0.5).clamp(-0.5, 0.5).permute(1, 0, 2, 3).contiguous()


# ------------------------------------------------------------------------------------------ data sets

def _is_frame_folder(path: Path) -> bool:
    return path.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.iterdir())


def _entry(root: Path, path: Path) -> VideoEntry:
    rel = path.relative_to(root)
    kind = "frames" if path.is_dir() else "file"
    return VideoEntry(str(rel if kind == "frames" else rel.with_suffix("")).replace("\\", "/"), path, kind)


def _is_video_file(path: Path, include_gif: bool) -> bool:
    suffix = path.suffix.lower()
    return path.is_file() and suffix in VIDEO_EXTENSIONS and (include_gif or suffix not in GIF_EXTENSIONS)


def _scan(root: Path, folder: Path, include_gif: bool) -> list[VideoEntry]:
    """Every video file and frame folder under ``folder`` (hidden names, e.g. partial writes, excluded)."""
    found = []
    for path in sorted(folder.rglob("*")):
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        if _is_video_file(path, include_gif) or _is_frame_folder(path):
            found.append(_entry(root, path))
    return found


def _listed(root: Path, listing: Path, missing: list | None) -> list[VideoEntry]:
    names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    absent = [name for name in names if not (root / name).exists()]
    gone = set(absent)
    if absent and missing is None:
        more = f" (and {len(absent) - 1} more listed there)" if len(absent) > 1 else ""
        raise UserError(f"video '{absent[0]}' listed in '{listing}' does not exist{more}; fix the list, or pass "
                        "--skip-missing to leave such videos out")
    for name in absent:
        log.warning("skipping video '%s' listed in '%s': it does not exist", name, listing)
        missing.append(name)
    return [_entry(root, root / name) for name in names if name not in gone]


def list_videos(root, split: str, include_gif: bool = False, missing: list | None = None) -> list[VideoEntry]:
    """Videos of ``split`` ('train' or 'test'): listed in ``SPLIT.txt``, else under ``SPLIT/``, else all under root.

    A split file's names are taken as listed (a listed .gif too). A listed name that does not exist is an
    error, or, when ``missing`` is a list, a warning and an entry appended to it. Scanned folders give
    video files and frame folders; ``.gif`` files only with ``include_gif``.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"video data set folder '{root}' does not exist")
    listing = root / f"{split}.txt"
    if listing.is_file():
        return _listed(root, listing, missing)
    if (root / split).is_dir():
        return _scan(root, root / split, include_gif)
    if any((root / f"{s}.txt").is_file() or (root / s).is_dir() for s in ("train", "test")):
        raise UserError(f"video data set '{root}' has no '{split}.txt' or '{split}/' for split '{split}'")
    # Allowed (a quick look at a folder of videos), but a test split made of the training videos is not one.
    log.warning("video data set '%s' has no train.txt/test.txt or train/ and test/ folders: split '%s' is every "
                "video in it, so train and test overlap; add train.txt and test.txt (or train/ and test/ folders) "
                "to hold videos out", root, split)
    return _scan(root, root, include_gif)


def _clip_item(clip: torch.Tensor, entry: VideoEntry, start: int, cfg: ClipConfig, fps: float) -> dict:
    return {"video": clip, "video_id": entry.video_id, "start": start, "stride": cfg.frame_stride,
            "fps": fps, "path": str(entry.path)}


def _report_skip(entry: VideoEntry, reason: str, skipped: list, why: str = "unreadable") -> None:
    log.warning("skipping video '%s': %s", entry.path, reason)
    skipped.append(SkippedVideo(str(entry.path), why))


def _too_short(entry: VideoEntry, n_frames: int, cfg: ClipConfig, skipped: list) -> None:
    _report_skip(entry, f"{n_frames} frames, a clip needs {cfg.span}", skipped, f"too short for {cfg.span} frames")


def _warn_if_upsampled(entry: VideoEntry, frames, resolution: int) -> None:
    """Upsampling adds no detail: the tokenizer then learns (and the model generates) blur."""
    h, w = frames.shape[1:3]
    if min(h, w) < resolution:
        log.warning("video '%s' is %dx%d: its short side %d is upsampled %.2fx to %d", entry.path, w, h, min(h, w),
                    resolution / min(h, w), resolution)


def iter_clips(entries: Iterable[VideoEntry], cfg: ClipConfig, skipped: list | None = None) -> Iterator[dict]:
    """Every clip (starts ``cfg.clip_starts``) of every video, decoding and preprocessing each video once.

    Unreadable or too-short videos are logged and appended to ``skipped`` (SkippedVideo) instead of stopping
    the stream; a video smaller than ``cfg.resolution`` is upsampled with a warning. Holds one whole video in
    memory at a time.
    """
    skipped = [] if skipped is None else skipped
    for entry in entries:
        try:
            frames, fps = read_video(entry.path)
        except VideoReadError as e:
            _report_skip(entry, str(e), skipped)
            continue
        starts = cfg.clip_starts(len(frames))
        if not starts:
            _too_short(entry, len(frames), cfg, skipped)
            continue
        _warn_if_upsampled(entry, frames, cfg.resolution)
        # Frames outside every clip (the tail) are never preprocessed; the rest exactly once.
        video = preprocess_frames(frames[:starts[-1] + cfg.span], cfg.resolution)
        for start in starts:
            yield _clip_item(video[:, start:start + cfg.span:cfg.frame_stride], entry, start, cfg, fps)


class VideoClipDataset(torch.utils.data.Dataset):
    """Clips of the videos of one split, as dicts {video [3, T, res, res], video_id, start, stride, fps, path}.

    ``starts='random'``: one item per video, a random clip drawn from (seed, index, epoch), so a run is
    reproducible and ``set_epoch`` gives new clips. ``starts='all'``: one item per (video, start).
    Videos that cannot be read or are too short are logged, listed in ``skipped`` and left out; a video
    that fails only when its clip is decoded is replaced by the next readable one. Each DataLoader worker
    keeps its own ``skipped`` list, and warns once per video it upsamples.
    """

    def __init__(self, root, split: str, cfg: ClipConfig, seed: int = 0, entries: list[VideoEntry] | None = None,
                 include_gif: bool = False):
        self.cfg, self.seed, self.epoch = cfg, seed, 0
        self.skipped: list[SkippedVideo] = []
        self._failed: set[int] = set()  # videos that probed fine but failed to decode later
        self._upsampling_checked: set[int] = set()
        self.videos: list[tuple[VideoEntry, int]] = []  # (entry, frame count) of every usable video
        all_entries = list_videos(root, split, include_gif) if entries is None else entries
        for entry in all_entries:
            try:
                n_frames, _ = probe_video(entry.path)
            except VideoReadError as e:
                _report_skip(entry, str(e), self.skipped)
                continue
            if n_frames < cfg.span:
                _too_short(entry, n_frames, cfg, self.skipped)
                continue
            self.videos.append((entry, n_frames))
        if not self.videos:
            why = f"{describe_skips(self.skipped)}; the warnings name each" if self.skipped else "no videos found"
            raise UserError(f"none of the {len(all_entries)} videos of split '{split}' in '{root}' is usable ({why})")
        # starts='all': item i is clip (video, start); cumulative counts map an index to its video.
        counts = [len(cfg.clip_starts(n)) if cfg.starts == "all" else 1 for _, n in self.videos]
        self._offsets = np.cumsum([0] + counts)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def _locate(self, index: int) -> tuple[int, int]:
        """(video number, clip start) of item ``index``."""
        video = int(np.searchsorted(self._offsets, index, side="right")) - 1
        n_frames = self.videos[video][1]
        if self.cfg.starts == "all":
            return video, self.cfg.clip_starts(n_frames)[index - self._offsets[video]]
        rng = np.random.default_rng([self.seed, index, self.epoch])
        return video, int(rng.integers(0, n_frames - self.cfg.span + 1))

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"clip index {index} out of range for {len(self)} clips")
        for attempt in range(len(self)):
            video, start = self._locate((index + attempt) % len(self))
            if video in self._failed:
                continue
            entry = self.videos[video][0]
            try:
                frames, fps = read_clip(entry.path, start, self.cfg.sequence_length, self.cfg.frame_stride)
            except VideoReadError as e:
                self._failed.add(video)
                _report_skip(entry, str(e), self.skipped)
                continue
            if video not in self._upsampling_checked:
                self._upsampling_checked.add(video)
                _warn_if_upsampled(entry, frames, self.cfg.resolution)
            return _clip_item(preprocess_frames(frames, self.cfg.resolution), entry, start, self.cfg, fps)
        raise UserError(f"no clip of the {len(self.videos)} videos could be decoded ({len(self.skipped)} skipped)")
