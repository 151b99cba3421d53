"""Metrics that need no I3D: how well a model predicts held-out codes, and how its samples' codes are spread.

- ``masked_prediction``: cross-entropy and top-1 accuracy of the model on held-out clips with half of
  every clip's codes masked (seeded), the training objective on data the model never saw;
- ``code_tv``: the total variation distance between two code histograms. Between generated and held-out
  clips it says how far the samples' code usage is from the data's; between training and held-out clips
  it is the floor a perfect model would reach at this count.

`mebt eval` and `mebt demo` report both next to FVD, so a run can be judged without I3D weights or a GPU.
"""
from __future__ import annotations

import torch

from mebt.core.objective import masked_loss


@torch.no_grad()
def masked_prediction(model, codes: torch.Tensor, generator: torch.Generator,
                      batch_size: int = 64) -> tuple[float, float]:
    """(mean cross-entropy, top-1 accuracy) over held-out code grids [N, ...] with half of each one masked."""
    codes = codes.flatten(1).long()
    n, length = codes.shape
    order = torch.rand(n, length, generator=generator).argsort(1)   # which half is masked: seeded
    device = next(model.parameters()).device
    total_loss = total_hits = 0.0
    for start in range(0, n, batch_size):
        part = slice(start, start + batch_size)
        batch, ctx, tgt = (t[part].to(device) for t in (codes, order[:, :length // 2], order[:, length // 2:]))
        loss, acc = masked_loss(model(batch, ctx, tgt), batch, tgt)
        total_loss += loss.item() * len(batch)
        total_hits += acc["acc1"] * len(batch)
    return total_loss / n, total_hits / n


def code_tv(a: torch.Tensor, b: torch.Tensor, vocab_size: int) -> float:
    """Total variation distance (in [0, 1]) between the code histograms of two sets of code grids."""
    pa, pb = (torch.bincount(torch.as_tensor(x).flatten().long(), minlength=vocab_size).double() / x.numel()
              for x in (a, b))
    return 0.5 * (pa - pb).abs().sum().item()
