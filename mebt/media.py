"""Sample videos as MP4 and GIF files, for logging to MLflow.

Pixels follow the tokenizer's convention (see ``mebt/tokenizer/vqgan.py``): float videos [N, C, T, H, W] in
[-0.5, 0.5], channels first, as ``VQGAN.decode`` returns them (unclamped). ``to_uint8`` turns them into
[N, T, H, W, 3] uint8, ``tile`` lays N clips out as one grid video, and ``write_mp4`` / ``write_gif``
encode it with PyAV (``write_mp4`` is the one MP4 writer: the data pipeline's videos go through it too).
Every file is written through ``mebt.fsutil.atomic_write``, so a crash or a failed encode never leaves a
half-written video under the final name.
"""
from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

from mebt.errors import UserError
from mebt.fsutil import atomic_write

PIXEL_RULES = ("round", "truncate")


def to_uint8(videos: torch.Tensor, pixels: str = "round") -> np.ndarray:
    """[N, C, T, H, W] float in [-0.5, 0.5] (channels first, VQGAN.decode's layout) -> uint8 [N, T, H, W, 3].

    Values are clamped first (decoded videos overshoot); one channel is repeated to three (grey).
    ``pixels="truncate"`` drops the fraction instead of rounding, as the official MeBT evaluation does
    (``(x * 255).astype(np.uint8)``); FVD protocols that reproduce it ask for it.
    """
    if videos.dim() != 5 or videos.shape[1] not in (1, 3):
        raise ValueError(f"expected videos [N, C, T, H, W] with C in (1, 3), got shape {list(videos.shape)}")
    if pixels not in PIXEL_RULES:
        raise ValueError(f"pixels must be one of {PIXEL_RULES}, got {pixels!r}")
    x = (videos.detach().float().cpu().clamp(-0.5, 0.5) + 0.5) * 255
    x = (x.round() if pixels == "round" else x.floor()).to(torch.uint8)
    x = x.permute(0, 2, 3, 4, 1)  # channels last, as video encoders and image viewers want
    if x.shape[-1] == 1:
        x = x.expand(*x.shape[:-1], 3)
    return np.ascontiguousarray(x.numpy())


def tile(frames: np.ndarray, ncols: int | None = None, pad: int = 2) -> np.ndarray:
    """[N, T, H, W, 3] -> [T, H', W', 3]: clip i at grid row i // ncols, column i % ncols.

    ``pad`` black pixels separate neighbouring tiles (none around the border); the grid is then padded at
    the bottom/right to an even height and width, which H.264 in yuv420p requires.
    """
    if frames.ndim != 5 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames [N, T, H, W, 3], got shape {list(frames.shape)}")
    n, t, h, w, _ = frames.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    gh, gw = nrows * h + (nrows - 1) * pad, ncols * w + (ncols - 1) * pad
    grid = np.zeros((t, gh + gh % 2, gw + gw % 2, 3), dtype=frames.dtype)
    for i in range(n):
        r, c = divmod(i, ncols)
        y, x = r * (h + pad), c * (w + pad)
        grid[:, y:y + h, x:x + w] = frames[i]
    return grid


def side_by_side(real: np.ndarray, *generated: np.ndarray, pad: int = 2) -> np.ndarray:
    """Real clips in the top row, each set of generated clips in a row below: [N, T, H, W, 3] each -> one
    [T, H', W', 3] grid."""
    for fake in generated:
        if real.shape != fake.shape:
            raise ValueError(f"real and generated clips differ in shape: {list(real.shape)} vs {list(fake.shape)}")
    return tile(np.concatenate([real, *generated]), ncols=real.shape[0], pad=pad)


def _check_frames(frames: np.ndarray) -> None:
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or frames.shape[0] == 0:
        raise ValueError(f"expected uint8 frames [T, H, W, 3] with T >= 1, got {frames.dtype} {list(frames.shape)}")


def _atomic_encode(path: str | Path, encode) -> Path:
    """Run ``encode(tmp_path)`` inside ``mebt.fsutil.atomic_write``; an unwritable path is a one-line UserError."""
    path = Path(path)
    try:
        with atomic_write(path) as tmp:
            encode(tmp)
    except OSError as e:  # PyAV's errors (e.g. av.error.PermissionError) are OSError subclasses too
        raise UserError(f"cannot write video '{path}': {e.strerror or e}") from None
    return path


def _mp4_codec() -> str:
    try:
        av.codec.Codec("libx264", "w")
        return "libx264"
    except Exception:  # an FFmpeg build without libx264 (it is GPL): the built-in MPEG-4 Part 2 encoder
        return "mpeg4"


def write_mp4(frames: np.ndarray, path: str | Path, fps: float = 8, crf: int = 18,
              keyframe_interval: int | None = None) -> Path:
    """uint8 [T, H, W, 3] -> H.264 (or MPEG-4 Part 2) yuv420p MP4, the one MP4 writer of mebt.

    Odd sizes get one black row/column (yuv420p halves the chroma size). ``crf`` 18 is near-lossless to
    the eye; ``fps`` may be fractional (29.97 stays exact); ``keyframe_interval`` sets the GOP length.
    """
    _check_frames(frames)
    t, h, w, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    codec = _mp4_codec()

    def encode(tmp: Path):
        with av.open(str(tmp), "w", format="mp4") as out:
            stream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
            if codec == "libx264":
                stream.options = {"crf": str(crf), "preset": "medium"} | (
                    {"g": str(keyframe_interval)} if keyframe_interval else {})
            else:
                stream.bit_rate = 8_000_000
            for frame in frames:
                out.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
            out.mux(stream.encode())  # flush delayed frames

    return _atomic_encode(path, encode)


def _palette(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One 256-colour palette for the whole clip: (indices [T, H, W] uint8, ARGB palette [256, 4] uint8).

    Colours are binned at 4 bits per channel; the 256 most frequent bins become palette entries holding
    their mean colour (so flat colours come back exact), and every bin maps to its nearest entry.
    """
    rgb = frames.reshape(-1, 3).astype(np.int64)
    bins = (rgb[:, 0] >> 4) << 8 | (rgb[:, 1] >> 4) << 4 | rgb[:, 2] >> 4
    counts = np.bincount(bins, minlength=4096)
    sums = np.stack([np.bincount(bins, rgb[:, ch], minlength=4096) for ch in range(3)], axis=1)
    keep = np.argsort(-counts, kind="stable")[:256]
    keep = keep[counts[keep] > 0]
    colours = (sums[keep] / counts[keep, None]).round()
    centres = (np.stack([np.arange(4096) >> 8, (np.arange(4096) >> 4) & 15, np.arange(4096) & 15], 1) << 4) + 8
    nearest = ((centres[:, None, :] - colours[None]) ** 2).sum(-1).argmin(1)  # [4096] bin -> palette entry
    nearest[keep] = np.arange(len(keep))  # a kept bin is its own entry
    palette = np.zeros((256, 4), dtype=np.uint8)
    palette[:, 0] = 255  # opaque: alpha 0 would make the GIF transparent there
    palette[:len(keep), 1:] = colours
    return nearest[bins].astype(np.uint8).reshape(frames.shape[:3]), palette


def write_gif(frames: np.ndarray, path: str | Path, fps: int = 8) -> Path:
    """uint8 [T, H, W, 3] -> looping GIF with one 256-colour palette for the clip (see ``_palette``)."""
    _check_frames(frames)
    indices, palette = _palette(frames)

    def encode(tmp: Path):
        with av.open(str(tmp), "w", format="gif") as out:
            stream = out.add_stream("gif", rate=fps)
            stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "pal8"
            for idx in indices:
                out.mux(stream.encode(av.VideoFrame.from_ndarray((idx, palette), format="pal8")))
            out.mux(stream.encode())

    return _atomic_encode(path, encode)


WRITERS = {"mp4": write_mp4, "gif": write_gif}


def write_formats(grid: np.ndarray, path_without_suffix: str | Path, fps: int = 8,
                  formats: tuple[str, ...] = ("mp4", "gif")) -> list[Path]:
    """uint8 frames [T, H, W, 3] -> one clip per format at ``path.<format>``; the paths written."""
    bad = [f for f in formats if f not in WRITERS]
    if bad:
        raise UserError(f"unknown video format '{bad[0]}' (known: {', '.join(WRITERS)})")
    base = Path(path_without_suffix)
    return [WRITERS[f](grid, base.with_name(f"{base.name}.{f}"), fps) for f in formats]


def write_video_grid(videos: torch.Tensor, path_without_suffix: str | Path, fps: int = 8,
                     ncols: int | None = None, formats: tuple[str, ...] = ("mp4", "gif")) -> list[Path]:
    """Videos [N, C, T, H, W] in [-0.5, 0.5] -> one grid clip per format at ``path.<format>``; the paths written."""
    return write_formats(tile(to_uint8(videos), ncols=ncols), path_without_suffix, fps, formats)
