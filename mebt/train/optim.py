"""The optimizer and learning-rate schedule of both trainers: the ``optim`` section of `mebt train` and of
`mebt tokenizer train` is the same ``OptimConfig``, the optimizer the same AdamW, the schedule the same
``lr_factor``. The tokenizer only starts from other defaults (``tokenizer_optim``: TATS's Adam betas, no
weight decay).

The schedule, for the 0-based optimizer step ``s`` of a run of ``steps`` steps with ``W = warmup_steps``:

* warmup, ``s < W``: ``lr * (s + 1) / W``; the first step already moves (``lr / W``), step ``W - 1`` runs at ``lr``;
* then ``constant``: ``lr``; or ``cosine``: from ``lr`` at step ``W`` down to ``lr * min_lr_ratio`` at step
  ``steps`` (one past the last step), ``lr * (r + (1 - r) * (1 + cos(pi * (s - W) / (steps - W))) / 2)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from mebt.config import check_at_least
from mebt.errors import ConfigError


@dataclass
class OptimConfig:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.01           # MeBT: on Linear weights only (the paper's AdamW groups); tokenizer: all
    grad_clip: float = 1.0               # global norm; 0 disables (DeepSpeed's default changed across versions)
    warmup_steps: int = 0                # linear warmup, see the module docstring
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.0            # cosine decays to lr * min_lr_ratio at the run's last step + 1

    def __post_init__(self):
        # nan compares false with everything, so each check is written to fail on it.
        for key in ("lr", "eps", "weight_decay", "grad_clip", "min_lr_ratio"):
            if not math.isfinite(getattr(self, key)):
                raise ConfigError(f"config key '{key}' must be a finite number, got {getattr(self, key)}")
        if not self.lr > 0:
            raise ConfigError(f"config key 'lr' must be positive, got {self.lr}")
        if not self.eps > 0:
            raise ConfigError(f"config key 'eps' must be positive, got {self.eps}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"config key 'betas' must be two numbers in [0, 1), got {list(self.betas)}")
        check_at_least(self, ("weight_decay", "grad_clip", "warmup_steps"), 0)
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"config key 'min_lr_ratio' must be in [0, 1], got {self.min_lr_ratio}")

    def adamw(self, params) -> torch.optim.AdamW:
        """AdamW over ``params`` (tensors, or groups that carry their own weight_decay)."""
        return torch.optim.AdamW(params, lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay)

    def lr_at(self, step: int, steps: int) -> float:
        """The learning rate of 0-based ``step`` in a run of ``steps`` steps."""
        return self.lr * lr_factor(self, steps)(step)


def tokenizer_optim(**overrides) -> OptimConfig:
    """``OptimConfig`` with the tokenizer's defaults: TATS's Adam betas, no weight decay, cosine floor 0.1."""
    return OptimConfig(**{"betas": (0.5, 0.9), "weight_decay": 0.0, "min_lr_ratio": 0.1, **overrides})


def lr_factor(cfg: OptimConfig, steps: int) -> Callable[[int], float]:
    """0-based step -> multiplier of ``cfg.lr`` (the module docstring's schedule); a ``LambdaLR`` lambda."""
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def lr_scheduler(cfg: OptimConfig, optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule as a torch scheduler, stepped once per optimizer step (DeepSpeed does it for MeBT)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, steps))
