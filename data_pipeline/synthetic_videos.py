"""Procedural synthetic videos: colored squares, circles and triangles bouncing over plain or gradient backgrounds.

``palette=K`` restricts shapes and (plain) backgrounds to K fixed colors each: the demo uses it so that a
tokenizer small enough to train in minutes on a CPU reconstructs crisp shapes.

The data set needs no download, so tokenizer training, preprocessing and the tests can run anywhere.
Every video is a pure function of ``(cfg.seed, index)`` and the rendering fields of the config, so a
partially written data set can be resumed and a test can compare a decoded mp4 with ``render_video``.
"""
from __future__ import annotations

import colorsys
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from mebt.config import refuse_changed_settings
from mebt.errors import ConfigError, UserError
from mebt.fsutil import leftovers, write_bytes
from mebt.media import write_mp4

SHAPES = ("square", "circle", "triangle")
# Fields that change the pixels or the container of a video; a resumed run must agree on all of them.
RENDER_FIELDS = ("frames", "resolution", "fps", "max_shapes", "palette", "seed")
META_FILE = "synth.json"
# libx264 constant-rate factor: near-lossless, so small shapes survive compression.
CRF = 10
# Width in pixels of the soft shape edges. yuv420p halves chroma resolution, so hard saturated edges lose
# most in the mp4 round trip; 1.5 px keeps shapes crisp and the round trip above ~30 dB PSNR at 64 px.
EDGE_WIDTH = 1.5


@dataclass
class SynthConfig:
    num_videos: int = 64
    frames: int = 32
    resolution: int = 64
    fps: int = 8
    max_shapes: int = 3
    # 0: any color, plain or gradient backgrounds. K > 0: shapes take one of K bright hues and backgrounds
    # one of K dark plain colors, so far fewer distinct patches exist and a small tokenizer keeps them crisp.
    palette: int = 0
    test_fraction: float = 0.25
    seed: int = 0

    def __post_init__(self):
        for key in ("num_videos", "frames", "fps", "max_shapes"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key '{key}' must be positive, got {getattr(self, key)}")
        if self.palette < 0:
            raise ConfigError(f"config key 'palette' must be 0 (any color) or a number of colors, got {self.palette}")
        if self.resolution < 16 or self.resolution % 2:
            raise ConfigError(f"config key 'resolution' must be an even number >= 16 (H.264 yuv420p), got {self.resolution}")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ConfigError(f"config key 'test_fraction' must be in [0, 1), got {self.test_fraction}")
        if self.seed < 0:
            raise ConfigError(f"config key 'seed' must be non-negative, got {self.seed}")


@dataclass
class SynthJob(SynthConfig):
    """`mebt data synth OUT`: the rendering settings and the output folder."""
    out: str = ""                         # output folder (mp4 files, train.txt, test.txt, synth.json)


def _bounce(start: float, velocity: float, n_frames: int, low: float, high: float) -> np.ndarray:
    """Positions over time of a point moving at constant speed in [low, high], reflecting at both ends."""
    span = high - low
    if span <= 0:
        return np.full(n_frames, low)
    raw = np.mod(start - low + velocity * np.arange(n_frames), 2 * span)
    return low + np.where(raw > span, 2 * span - raw, raw)


def palette_color(index: int, palette: int, bright: bool) -> np.ndarray:
    """Color ``index`` of a ``palette``-color set: evenly spaced hues, bright for shapes, dark for backgrounds.

    Background hues sit halfway between shape hues, so a shape never matches its background.
    """
    if bright:
        rgb = colorsys.hsv_to_rgb(index / palette, 0.75, 1.0)
    else:
        rgb = colorsys.hsv_to_rgb((index + 0.5) / palette, 0.6, 0.35)
    return np.array(rgb) * 255


def _random_color(rng: np.random.Generator, bright: bool, palette: int = 0) -> np.ndarray:
    """A saturated bright color for shapes or a darker one for backgrounds, so shapes always stand out."""
    if palette:
        return palette_color(int(rng.integers(palette)), palette, bright)
    color = rng.uniform(150, 255, 3) if bright else rng.uniform(0, 110, 3)
    if bright:
        color[rng.integers(3)] = rng.uniform(0, 150)  # lower one channel: distinct hues, not all fully saturated
    return color


def _background(rng: np.random.Generator, res: int, palette: int = 0) -> np.ndarray:
    """[res, res, 3] float background: a plain color or a linear gradient between two dark colors."""
    first = _random_color(rng, bright=False, palette=palette)
    if palette or rng.random() < 0.5:
        return np.broadcast_to(first, (res, res, 3)).copy()
    second = _random_color(rng, bright=False)
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:res, 0:res] / max(res - 1, 1)
    t = (np.cos(angle) * (xs - 0.5) + np.sin(angle) * (ys - 0.5)) / np.sqrt(0.5) + 0.5
    t = np.clip(t, 0.0, 1.0)[..., None]
    return (1 - t) * first + t * second


def _signed_distance(kind: str, px: np.ndarray, py: np.ndarray, radius: float, angle: np.ndarray) -> np.ndarray:
    """Approximate signed distance (pixels, negative inside) of points relative to each frame's shape center.

    ``px``/``py`` are [T, H, W] offsets from the center and ``angle`` is [T] rotation. Polygons use the
    maximum over their edges' half-plane distances, exact inside and close enough outside for anti-aliasing.
    """
    if kind == "circle":
        return np.sqrt(px ** 2 + py ** 2) - radius
    n_sides = 4 if kind == "square" else 3
    # Apothem of a regular polygon with circumradius ``radius``: the distance from center to each edge.
    apothem = radius * np.cos(np.pi / n_sides)
    dist = np.full(px.shape, -np.inf)
    for k in range(n_sides):
        normal = angle + (2 * k + 1) * np.pi / n_sides
        dist = np.maximum(dist, np.cos(normal)[:, None, None] * px + np.sin(normal)[:, None, None] * py - apothem)
    return dist


def render_video(index: int, cfg: SynthConfig) -> np.ndarray:
    """uint8 [T, H, W, 3] video ``index`` of the data set described by ``cfg``; deterministic."""
    if index < 0:
        raise ValueError(f"video index must be non-negative, got {index}")
    rng = np.random.default_rng([cfg.seed, index])
    res, n_frames = cfg.resolution, cfg.frames
    canvas = np.broadcast_to(_background(rng, res, cfg.palette), (n_frames, res, res, 3)).copy()
    ys, xs = np.mgrid[0:res, 0:res] + 0.5  # pixel centers
    scale = res / 64  # sizes and speeds are drawn for 64 px and scaled, so motion looks alike at every resolution
    for _ in range(rng.integers(1, cfg.max_shapes + 1)):
        kind = SHAPES[rng.integers(len(SHAPES))]
        radius = rng.uniform(5, 14) * scale
        speed = rng.uniform(1.0, 3.5) * scale  # pixels per frame; never zero so every shape moves
        heading = rng.uniform(0, 2 * np.pi)
        spin = rng.choice([0.0, rng.uniform(-0.15, 0.15)])  # radians per frame
        cx = _bounce(rng.uniform(radius, res - radius), speed * np.cos(heading), n_frames, radius, res - radius)
        cy = _bounce(rng.uniform(radius, res - radius), speed * np.sin(heading), n_frames, radius, res - radius)
        angle = rng.uniform(0, 2 * np.pi) + spin * np.arange(n_frames)
        sd = _signed_distance(kind, xs - cx[:, None, None], ys - cy[:, None, None], radius, angle)
        alpha = np.clip(0.5 - sd / EDGE_WIDTH, 0.0, 1.0)[..., None]
        canvas = (1 - alpha) * canvas + alpha * _random_color(rng, bright=True, palette=cfg.palette)
    return np.round(canvas).astype(np.uint8)


def video_id(index: int) -> str:
    return f"synth_{index:06d}"


def split_indices(cfg: SynthConfig) -> tuple[list[int], list[int]]:
    """(train, test) video indices: a seeded random ``test_fraction`` of the videos is held out."""
    order = np.random.default_rng([cfg.seed, cfg.num_videos]).permutation(cfg.num_videos)
    n_test = int(round(cfg.num_videos * cfg.test_fraction))
    return sorted(order[n_test:].tolist()), sorted(order[:n_test].tolist())


def _check_resumable(out_dir: Path, cfg: SynthConfig) -> None:
    """Refuse to mix videos of different configs in one folder (resumed files would silently disagree)."""
    meta_path = out_dir / META_FILE
    if not meta_path.is_file():
        return
    try:
        old = json.loads(meta_path.read_text())["config"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"'{meta_path}' is not a synthetic data set description; use an empty output folder") from None
    refuse_changed_settings(f"'{out_dir}' holds synthetic videos of another config", old,
                            {k: getattr(cfg, k) for k in RENDER_FIELDS}, "use a new output folder", UserError)


def write_synthetic_dataset(out_dir, cfg: SynthConfig, progress: bool = True) -> dict:
    """Write ``cfg.num_videos`` H.264 mp4 files plus train.txt / test.txt / synth.json into ``out_dir``.

    Resumable: a video whose final file exists is skipped. Each file is encoded under a hidden temporary
    name and renamed when complete, so an interrupted run never leaves a truncated ``VIDEOID.mp4``.
    Returns counts {'written', 'skipped', 'train', 'test'} and the output folder.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_resumable(out_dir, cfg)
    # The description and splits are written first: a rerun after an interruption must find them to refuse
    # mixing configs, and they depend only on the config.
    train, test = split_indices(cfg)
    for name, indices in (("train", train), ("test", test)):
        write_bytes(out_dir / f"{name}.txt", "".join(f"{video_id(i)}.mp4\n" for i in indices).encode())
    meta = {"generator": "data_pipeline.synthetic_videos", "config": dataclasses.asdict(cfg),
            "videos": cfg.num_videos, "train": len(train), "test": len(test)}
    write_bytes(out_dir / META_FILE, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    written = skipped = 0
    for index in tqdm(range(cfg.num_videos), desc="synthetic videos", unit="video", disable=not progress):
        final = out_dir / f"{video_id(index)}.mp4"
        if final.is_file():
            skipped += 1
            continue
        for leftover in leftovers(final):   # the temporary file of a run killed while encoding this video
            leftover.unlink()
        write_mp4(render_video(index, cfg), final, cfg.fps, crf=CRF)   # atomic: no partial video on a crash
        written += 1
    return {"out_dir": str(out_dir), "written": written, "skipped": skipped, "train": len(train), "test": len(test)}
