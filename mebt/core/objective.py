"""MeBT training objective: which positions are observed, which are predicted, and the loss.

Per batch (official recipe): t ~ U(t_range), mask ratio r = schedule(t), n_masked = ceil(r * N); a random
permutation per sample makes the first N - n_masked positions contexts and the last min(budget, n_masked)
targets. The loss is the summed cross-entropy over the targets divided by B * n_masked (the official
``avg_loss``): the mean over the targets without a budget. For long videos a length curriculum
(``t_prior``) first draws a clip of L latent frames at a random temporal offset per sample, so early
training sees short clips at every position of the grid.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mebt.errors import ConfigError

MASK_SCHEDULES = {
    "linear": lambda t: 1.0 - t,
    "cosine": lambda t: math.cos(math.pi * t / 2),
    "square": lambda t: 1.0 - t ** 2,
    "cubic": lambda t: 1.0 - t ** 3,
    "sqrt": lambda t: 1.0 - math.sqrt(t),
}
# Gaussian curricula: the preferred clip length grows by one latent frame every `spread` steps.
GAUSSIAN_PRIORS = {"gaussian2": 30000, "gaussian100000_2": 100000}


@dataclass
class ObjectiveConfig:
    mask_schedule: Literal["linear", "cosine", "square", "cubic", "sqrt"] = "linear"
    t_range: tuple[float, float] = (0.0, 1.0)
    target_budget: Optional[int] = None   # cap on predicted positions per sample; None = all masked
    t_prior: Literal["longest", "uniform", "gaussian2", "gaussian100000_2"] = "longest"
    label_smoothing: float = 0.0
    loss_chunk_rows: int = 4096           # target rows per head + cross-entropy chunk (memory, not maths)

    def __post_init__(self):
        lo, hi = self.t_range
        if not 0.0 <= lo <= hi <= 1.0:
            raise ConfigError(f"config key 't_range' must satisfy 0 <= low <= high <= 1, got {list(self.t_range)}")
        if self.target_budget is not None and self.target_budget < 1:
            raise ConfigError(f"config key 'target_budget' must be >= 1 or null, got {self.target_budget}")
        if self.loss_chunk_rows < 1:
            raise ConfigError(f"config key 'loss_chunk_rows' must be >= 1, got {self.loss_chunk_rows}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"config key 'label_smoothing' must be in [0, 1), got {self.label_smoothing}")


@dataclass
class MaskedBatch:
    ctx_idx: torch.Tensor   # [B, N_ctx] positions in the flattened grid
    tgt_idx: torch.Tensor   # [B, N_tgt]
    clip_frames: int        # latent frames L of the curriculum window
    mask_ratio: float
    n_masked: int           # masked positions per sample: N_tgt, or more when target_budget caps the targets


def clip_length_probs(prior: str, n_frames: int, step: int) -> torch.Tensor:
    """Probability of each clip length L = 1..n_frames at training ``step``."""
    lengths = torch.arange(1, n_frames + 1, dtype=torch.float64)
    if prior == "longest":
        return (lengths == n_frames).double()
    if prior == "uniform":
        return torch.full_like(lengths, 1.0 / n_frames)
    spread = GAUSSIAN_PRIORS[prior]
    # w = exp(-(step - (L-1)*s)^2 / (2*(2s)^2)); normalized in log space so late steps never underflow to 0/0.
    log_w = -((step - (lengths - 1) * spread) ** 2) / (2 * (2 * spread) ** 2)
    return torch.softmax(log_w, dim=0)


def slot_seeds(seed: int, epoch: int, sample_ids: torch.Tensor) -> list[int]:
    """One mask seed per clip from the run's seed and the clip's slot (its epoch and the loader's
    ``sample_id``), for ``sample_masks(sample_seeds=...)``; ``sample_ids`` is the loader's CPU tensor."""
    return [hash((seed, epoch, i)) & (2 ** 63 - 1) for i in sample_ids.tolist()]


def sample_masks(cfg: ObjectiveConfig, batch_size: int, latent_shape, step: int = 0,
                 generator: Optional[torch.Generator] = None,
                 shared: Optional[torch.Generator] = None,
                 sample_seeds: Optional[Sequence[int]] = None) -> MaskedBatch:
    """Context and target positions for one batch (CPU tensors; equal counts for every sample).

    The clip length and mask ratio come from ``shared`` when given (else from ``generator``): a trainer
    seeds it the same on every rank, so all ranks do the same amount of work per step and make the same
    module calls (ZeRO-3 gathers parameters call by call). Each sample's clip offset and masked positions
    come from ``generator``, or, given ``sample_seeds``, from a generator of each sample's own seed: then
    they follow the sample, not the process or micro-batch that takes it (elastic resume).
    """
    shared = shared if shared is not None else generator
    n_frames, h, w = latent_shape
    frame = h * w
    probs = clip_length_probs(cfg.t_prior, n_frames, step)
    clip = int(torch.multinomial(probs, 1, generator=shared)) + 1
    if sample_seeds is None:
        offset = torch.randint(0, n_frames - clip + 1, (batch_size, 1), generator=generator)
    else:
        if len(sample_seeds) != batch_size:
            raise ValueError(f"{len(sample_seeds)} sample seeds for a batch of {batch_size}")
        own = [torch.Generator().manual_seed(int(seed)) for seed in sample_seeds]
        offset = torch.cat([torch.randint(0, n_frames - clip + 1, (1, 1), generator=g) for g in own])
    n = clip * frame
    lo, hi = cfg.t_range
    t = lo + (hi - lo) * float(torch.rand((), generator=shared, dtype=torch.float64))
    ratio = MASK_SCHEDULES[cfg.mask_schedule](t)
    n_masked = min(max(math.ceil(ratio * n), 1), n)   # at least one target so the loss is defined
    n_tgt = n_masked if cfg.target_budget is None else min(cfg.target_budget, n_masked)
    if sample_seeds is None:
        noise = torch.rand(batch_size, n, generator=generator)
    else:
        noise = torch.stack([torch.rand(n, generator=g) for g in own])
    perm = noise.argsort(dim=1) + offset * frame
    return MaskedBatch(ctx_idx=perm[:, : n - n_masked], tgt_idx=perm[:, n - n_tgt:], clip_frames=clip,
                       mask_ratio=ratio, n_masked=n_masked)


def _loss_terms(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float):
    """Summed cross-entropy and top-1/top-5 hit counts for logits [M, V] (float32 for bf16 safety)."""
    logits = logits.float()
    ce = F.cross_entropy(logits, labels, label_smoothing=label_smoothing, reduction="sum")
    with torch.no_grad():
        hits = logits.topk(min(5, logits.shape[-1]), dim=-1).indices == labels.unsqueeze(-1)
        return ce, hits[:, 0].sum(), hits.any(-1).sum()


def _chunk_terms(features, head, labels, label_smoothing):
    # The head is called as a module (not F.linear on its weight): ZeRO-3 gathers its weight on the call.
    return _loss_terms(head(features), labels, label_smoothing)


def _per_masked(ce: torch.Tensor, tgt_idx: torch.Tensor, n_masked: Optional[int]) -> torch.Tensor:
    # The official loss divides by B * n_masked, not by the number of targets: under a target budget it is
    # the targets' mean scaled by n_targets / n_masked, and a reproduction must weigh its gradients the same.
    n_masked = tgt_idx.shape[1] if n_masked is None else n_masked
    if n_masked < tgt_idx.shape[1]:
        raise ValueError(f"n_masked ({n_masked}) is below the {tgt_idx.shape[1]} targets per sample")
    return ce / (tgt_idx.shape[0] * n_masked)


def masked_loss(logits: torch.Tensor, codes: torch.Tensor, tgt_idx: torch.Tensor, label_smoothing: float = 0.0,
                *, n_masked: Optional[int] = None) -> tuple[torch.Tensor, dict]:
    """Summed cross-entropy over targets / (B * n_masked) plus top-1/top-5 accuracy over the targets, from
    logits [B, N_tgt, V]. ``n_masked``: masked positions per sample (default N_tgt: the mean over targets)."""
    labels = codes.flatten(1).gather(1, tgt_idx).flatten()
    ce, hit1, hit5 = _loss_terms(logits.flatten(0, 1), labels, label_smoothing)
    n = labels.numel()
    return _per_masked(ce, tgt_idx, n_masked), {"acc1": hit1.item() / n, "acc5": hit5.item() / n}


def chunked_masked_loss(features: torch.Tensor, head: nn.Linear, codes: torch.Tensor, tgt_idx: torch.Tensor,
                        label_smoothing: float = 0.0, chunk_rows: int = 4096, *,
                        n_masked: Optional[int] = None) -> tuple[torch.Tensor, dict]:
    """``masked_loss(head(features), ...)`` without ever holding more than ``chunk_rows`` rows of logits.

    At 16384 codes the fp32 logits of 8192 targets are 512 MiB per sample, more than all of MeBT's other
    activations; each chunk's logits are recomputed in backward instead of being kept. The accuracies are
    float64 0-dim tensors on the features' device, not floats: reading one waits for the device, which a
    training loop does only when it logs.
    """
    labels = codes.flatten(1).gather(1, tgt_idx).flatten()
    rows = features.flatten(0, 1)
    ce = hit1 = hit5 = 0
    for start in range(0, rows.shape[0], chunk_rows):
        part = slice(start, start + chunk_rows)
        terms = checkpoint(_chunk_terms, rows[part], head, labels[part], label_smoothing, use_reentrant=False)
        ce, hit1, hit5 = ce + terms[0], hit1 + terms[1], hit5 + terms[2]
    n = labels.numel()
    return _per_masked(ce, tgt_idx, n_masked), {"acc1": hit1.double() / n, "acc5": hit5.double() / n}


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups as in the paper: decay only on Linear weights; biases, norms and embeddings are free."""
    decay = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if id(p) in decay], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0},
    ]
