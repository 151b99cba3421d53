"""Procedural code grids with learnable spatio-temporal structure, for smoke training and tests.

Each sample is a T x H x W grid of codes: one background code everywhere and a square object of another
code that moves with a constant velocity and bounces off the borders. A model that has learned the data
must infer both codes, the size, the position and the velocity from the observed tokens; ``is_plausible``
checks a generated grid against those rules, so sampled grids can be scored without a tokenizer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mebt.errors import ConfigError


@dataclass
class SyntheticCodesConfig:
    num_samples: int = 4096
    sizes: tuple[int, ...] = (2, 3)   # side lengths of the square object
    seed: int = 0

    def __post_init__(self):
        if self.num_samples < 1:
            raise ConfigError(f"config key 'num_samples' must be positive, got {self.num_samples}")
        if not self.sizes or min(self.sizes) < 1:
            raise ConfigError(f"config key 'sizes' must be positive side lengths, got {list(self.sizes)}")


def _bounce(start: torch.Tensor, velocity: torch.Tensor, n_frames: int, span: torch.Tensor) -> torch.Tensor:
    """Positions [B, T] of points moving in [0, span] (per sample) that reflect at both ends (a triangle wave)."""
    period = (2 * span).clamp(min=1)[:, None]
    raw = (start[:, None] + velocity[:, None] * torch.arange(n_frames)) % period
    pos = torch.where(raw > span[:, None], period - raw, raw)
    return torch.where(span[:, None] > 0, pos, torch.zeros_like(pos))  # an object as wide as the grid cannot move


def make_code_grids(cfg: SyntheticCodesConfig, latent_shape, vocab_size: int) -> torch.Tensor:
    """[num_samples, T, H, W] long codes, deterministic for a given config."""
    n_frames, h, w = latent_shape
    if max(cfg.sizes) >= min(h, w):
        raise ConfigError(f"config key 'sizes' {list(cfg.sizes)} must be smaller than the {h}x{w} code grid")
    if vocab_size < 2:
        raise ConfigError(f"vocab_size {vocab_size} is too small for synthetic codes (need >= 2)")
    g = torch.Generator().manual_seed(cfg.seed)
    b = cfg.num_samples
    half = vocab_size // 2
    background = torch.randint(0, half, (b,), generator=g)
    obj = torch.randint(half, vocab_size, (b,), generator=g)
    size = torch.tensor(cfg.sizes)[torch.randint(0, len(cfg.sizes), (b,), generator=g)]
    span_y, span_x = h - size, w - size
    start_y = (torch.rand(b, generator=g) * (span_y + 1)).long()
    start_x = (torch.rand(b, generator=g) * (span_x + 1)).long()
    y = _bounce(start_y, torch.randint(-1, 2, (b,), generator=g), n_frames, span_y)
    x = _bounce(start_x, torch.randint(-1, 2, (b,), generator=g), n_frames, span_x)
    rows = torch.arange(h).view(1, 1, h, 1)
    cols = torch.arange(w).view(1, 1, 1, w)
    s = size.view(b, 1, 1, 1)
    inside = (rows >= y[:, :, None, None]) & (rows < y[:, :, None, None] + s) \
        & (cols >= x[:, :, None, None]) & (cols < x[:, :, None, None] + s)
    return torch.where(inside, obj.view(b, 1, 1, 1), background.view(b, 1, 1, 1))


def uses_data_palette(grid: torch.Tensor, vocab_size: int) -> bool:
    """True when a grid uses exactly one background code (< vocab/2) and one object code (>= vocab/2)
    throughout the video: the weaker, graded half of ``is_plausible`` (random or collapsed grids fail it)."""
    values = grid.unique()
    return len(values) == 2 and bool(values[0] < vocab_size // 2 <= values[1])


def is_plausible(grid: torch.Tensor) -> bool:
    """True when a [T, H, W] grid follows the data's rules: two codes, one same-size square per frame."""
    values = grid.unique()
    if len(values) != 2:
        return False
    counts = [(grid == v).sum().item() for v in values]
    obj = values[int(counts[0] > counts[1])]  # the object is the rarer code
    side = None
    for frame in grid:
        ys, xs = torch.nonzero(frame == obj, as_tuple=True)
        if len(ys) == 0:
            return False
        hgt, wid = int(ys.max() - ys.min()) + 1, int(xs.max() - xs.min()) + 1
        if hgt != wid or hgt * wid != len(ys) or side not in (None, hgt):
            return False
        side = hgt
    return True
