"""FVD protocols: everything that makes two FVD numbers comparable, named, and recorded with each number.

An FVD number depends on more than the two video sets: the I3D weights and numerics, how generated
pixels become uint8, the Frechet-distance arithmetic, how many videos on each side, and how many
independent generated sets were averaged. A protocol fixes those choices:

| protocol | arithmetic (``mebt.eval.fvd``) | I3D numerics | generated pixels | generated x runs vs real |
|---|---|---|---|---|
| ``float64`` (default) | float64, biased covariance (StyleGAN-V) | tf (BatchNorm eps 1e-3) | rounded | as given |
| ``tats`` | float32, unbiased, TF-GAN root (TATS/MeBT) | tats (eps 1e-5, the TATS port) | truncated | as given |
| ``mebt_16f`` | as ``tats`` | tats | truncated | 2048 x 10 vs 2048 |
| ``mebt_128f`` | as ``tats`` | tats | truncated | 512 x 5 vs 512 |

``mebt_16f``/``mebt_128f`` are the MeBT paper's evaluation (the published scripts sample 10 or 5 sets and
report the mean; the official code truncates generated pixels to uint8). With several runs every
metric is reported as the mean over runs with its standard deviation; all runs are scored against the
same real set.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from mebt.errors import ConfigError


@dataclass(frozen=True)
class FVDProtocol:
    name: str
    arithmetic: str                  # mebt.eval.fvd.PROTOCOLS key: "float64" or "tats"
    i3d_numerics: str                # mebt.eval.i3d.NUMERICS key: "tf" or "tats"
    pixels: str                      # generated videos -> uint8: "round" or "truncate" (mebt.media.to_uint8)
    num_samples: Optional[int] = None   # generated videos per run (None: the user's choice)
    runs: Optional[int] = None          # independent generated sets, each scored against the real set
    num_real: Optional[int] = None
    as_in: str = ""


PROTOCOLS: dict[str, FVDProtocol] = {p.name: p for p in (
    FVDProtocol("float64", "float64", "tf", "round", as_in="the original FVD network and StyleGAN-V's arithmetic"),
    FVDProtocol("tats", "tats", "tats", "truncate", as_in="TATS / MeBT code (the TATS I3D port, float32)"),
    FVDProtocol("mebt_16f", "tats", "tats", "truncate", 2048, 10, 2048, as_in="MeBT paper, 16-frame models"),
    FVDProtocol("mebt_128f", "tats", "tats", "truncate", 512, 5, 512, as_in="MeBT paper, 128-frame models"),
)}
# What an unset count means when the protocol does not fix it.
DEFAULT_COUNTS = {"num_samples": 256, "runs": 1, "num_real": 256}


def get_protocol(name: str) -> FVDProtocol:
    if name not in PROTOCOLS:
        raise ConfigError(f"unknown FVD protocol {name!r}; choose one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def resolve_counts(protocol: FVDProtocol, **given: Optional[int]) -> dict[str, int]:
    """The counts (num_samples, runs, num_real) to use: the protocol's, the user's where it fixes none.

    A count the user gave that contradicts the protocol is refused: a number labelled ``mebt_16f`` must
    have been computed with the paper's counts.
    """
    counts = {}
    for key, default in DEFAULT_COUNTS.items():
        fixed, value = getattr(protocol, key), given.get(key)
        if fixed is not None and value is not None and value != fixed:
            raise ConfigError(f"protocol '{protocol.name}' fixes {key}={fixed}, but {value} was given: drop the "
                              f"option or use --protocol {protocol.arithmetic}")
        counts[key] = fixed if fixed is not None else (default if value is None else value)
        if counts[key] < 1:
            raise ConfigError(f"'{key}' must be >= 1, got {counts[key]}")
    return counts


def record(protocol: FVDProtocol, network: dict, **facts) -> dict:
    """The description stored with every number: protocol, arithmetic, network, counts and ``facts``."""
    from mebt.eval.fvd import KVD_PROTOCOL
    from mebt.eval.fvd import PROTOCOLS as ARITHMETIC

    return {**asdict(protocol), **{k: v for k, v in ARITHMETIC[protocol.arithmetic].items() if k != "as_in"},
            "i3d": network, "kvd": KVD_PROTOCOL, **facts}


def fvd_kvd(real: np.ndarray, fake_runs: list[np.ndarray], protocol: FVDProtocol, name: str) -> tuple[dict, dict]:
    """FVD and KVD of each generated set against ``real``: (metrics, per-run values).

    metrics: ``fvd{name}``/``kvd{name}``, the mean over runs, plus ``..._std`` (population standard
    deviation over runs) when there are several; per run: the list of each run's values.
    """
    from mebt.eval.fvd import fvd, kvd  # torch: imported when numbers are computed, not by `mebt --help`

    values = {f"fvd{name}": [fvd(real, f, protocol=protocol.arithmetic) for f in fake_runs],
              f"kvd{name}": [kvd(real, f) for f in fake_runs]}
    metrics = {}
    for key, runs in values.items():
        metrics[key] = float(np.mean(runs))
        if len(runs) > 1:
            metrics[f"{key}_std"] = float(np.std(runs))
    return metrics, values
