"""A random-weight I3D in the exact layout of i3d_pretrained_400.pt, for tests that score FVD end to end
(the real weights cannot be downloaded here; the layout is the one the loader checks)."""
import json
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]


def fake_i3d(path: Path) -> Path:
    """Random weights in exactly the layout of i3d_pretrained_400.pt (without num_batches_tracked)."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for line in (ROOT / "tests" / "data" / "i3d_kinetics400_state_dict.tsv").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, _ = line.split("\t")
        if key.endswith("num_batches_tracked"):
            continue
        shape = json.loads(shape)
        if key.endswith("running_var"):
            state[key] = torch.ones(shape)
        elif key.endswith("running_mean") or key.endswith(".bias"):
            state[key] = torch.zeros(shape)
        elif key.endswith("bn.weight"):
            state[key] = torch.ones(shape)
        else:
            fan_in = max(1, int(np.prod(shape[1:])))
            state[key] = torch.randn(shape, generator=g) / fan_in ** 0.5
    torch.save(state, path)
    return path
