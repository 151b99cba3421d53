"""FVD/KVD of an evaluation's samples: I3D features per sample batch, real features, every metric variant.

Generated features are computed per sample batch by the process that sampled it and kept next to the
batch (``features/<key>/batch_J.npz``), so sharded evaluations spread the I3D work too, and a batch's
features do not depend on which process made them: the numbers are the same for 1 or N shards. Real
features are cached on disk, keyed by everything they depend on.

Variants, for samples of T frames (``name`` is the metric suffix):
- ``fvd{T}``/``kvd{T}``: whole samples against whole real clips of T frames (FVD16, FVD128).
- ``fvd{T}x{R}``/``kvd{T}x{R}``, with every frame shown R times (``repeat``): clips too short for I3D
  (T < 9, e.g. 8-frame samples as 16 frames), scored this way on both sides; only comparable with
  numbers scored the same way. No window variants.
- T > 16, ``fvd16_sliding_pooled``: every 16-frame window starting each 8 frames (the last full window
  included) of every sample, pooled into one set, against the same windows of the real clips.
- T > 16, ``fvd16_start{s}`` and their mean ``fvd16_sliding_mean``: the official MeBT sliding FVD: one
  FVD per window start s in range(0, T - 16, 8) (the last full window excluded, as in the official
  script), the samples' window at s against real 16-frame clips.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mebt.eval.fvd import sliding_windows
from mebt.eval.i3d import i3d_features
from mebt.eval.protocols import fvd_kvd, get_protocol, record
from mebt.fsutil import atomic_write, write_json

WINDOW, STRIDE = 16, 8

log = logging.getLogger(__name__)


def window_starts(frames: int) -> list[int]:
    """Starts of the pooled sliding windows (every full window, the last included)."""
    return list(range(0, frames - WINDOW + 1, STRIDE))


def official_starts(frames: int) -> list[int]:
    """Starts the official sliding FVD scores: ``range(0, T - 16, 8)``, which leaves out the last window."""
    return list(range(0, frames - WINDOW, STRIDE))


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def _save_npz(path: Path, **arrays) -> None:
    with atomic_write(path) as tmp:
        np.savez(tmp, **arrays)


def features_dir(samples: Path, network: dict, frames: int, repeat: int = 1) -> Path:
    """Where the features of the sample batches live for this network, numerics, clip length and repeat."""
    return samples.parent / "features" / _digest({"network": network, "frames": frames,
                                                  **({"repeat_frames": repeat} if repeat > 1 else {})})


def repeat_frames(videos: np.ndarray, repeat: int) -> np.ndarray:
    """uint8 videos [n, T, H, W, 3] with every frame shown ``repeat`` times in a row: [n, T x repeat, ...]."""
    return videos if repeat == 1 else np.repeat(videos, repeat, axis=1)


def batch_features(videos: np.ndarray, i3d, device, repeat: int = 1) -> dict[str, np.ndarray]:
    """``full`` [n, 400] features of uint8 videos [n, T, H, W, 3] (each frame shown ``repeat`` times), and
    ``windows`` [n, W, 400] when T > 16 and frames are not repeated."""
    out = {"full": i3d_features(i3d, torch.from_numpy(repeat_frames(videos, repeat)), device=device)
           .astype(np.float32)}
    if repeat == 1 and videos.shape[1] > WINDOW:
        windows = sliding_windows(videos, WINDOW, STRIDE)   # the windows of one video are consecutive
        feats = i3d_features(i3d, torch.from_numpy(windows), device=device).astype(np.float32)
        out["windows"] = feats.reshape(len(videos), -1, feats.shape[-1])
    return out


def generated_features(batch_files: list[Path], frames: int | None, i3d, device,
                       repeat: int = 1) -> dict[str, np.ndarray]:
    """Features of every listed sample batch (first ``frames`` frames, each shown ``repeat`` times), computing
    only the missing ones."""
    folder = None
    parts: dict[str, list[np.ndarray]] = {}
    for path in tqdm(batch_files, desc="I3D features (generated)", unit="batch"):
        with np.load(path, allow_pickle=False) as batch:
            if folder is None:
                frames = frames or batch["video"].shape[1]
                folder = features_dir(path.parent, i3d.network, frames, repeat)
            out = folder / path.name
            if not out.exists():
                _save_npz(out, **batch_features(batch["video"][:, :frames], i3d, device, repeat))
        with np.load(out, allow_pickle=False) as feats:
            for key in feats.files:
                parts.setdefault(key, []).append(feats[key])
    return {key: np.concatenate(value) for key, value in parts.items()}


def cached_array(key: dict, cache_dir: Path, compute, what: str) -> np.ndarray:
    """The array stored under ``key`` (everything it depends on) in ``cache_dir``, else ``compute()``d and stored."""
    path = Path(cache_dir) / f"{_digest(key)}.npy"
    if path.exists():
        log.info(f"{what} from the cache: {path}")
        return np.load(path, allow_pickle=False)
    array = compute()
    log.info(f"{what}: {len(array)} rows -> {path}")
    with atomic_write(path) as tmp:
        np.save(tmp, array, allow_pickle=False)
    write_json(path.with_suffix(".json"), key)
    return array


def real_features(key: dict, cache_dir: Path, clips, i3d, device, windows: bool = False,
                  repeat: int = 1) -> np.ndarray:
    """I3D features of the real clips (pooled over sliding windows with ``windows``; each frame shown
    ``repeat`` times), cached on disk under ``key`` (everything they depend on); ``clips()`` gives the uint8
    clips on a cache miss."""
    def compute():
        videos = repeat_frames(clips(), repeat)
        if windows:
            videos = sliding_windows(videos, WINDOW, STRIDE)
        return i3d_features(i3d, torch.from_numpy(videos), device=device, desc="I3D features (real)")

    extra = {"repeat_frames": repeat} if repeat > 1 else {}   # keys of unrepeated features stay as they were
    return cached_array({**key, "windows": windows, "i3d": i3d.network, **extra}, cache_dir, compute,
                        "real features" + (" (sliding windows)" if windows else ""))


def score(generated: dict[str, np.ndarray], real_of, protocol_name: str, runs: int, i3d, **facts) -> dict:
    """Every metric variant over ``runs`` equal consecutive generated sets.

    ``real_of(frames, windows)`` gives the real features for clips of ``frames`` frames (pooled windows with
    ``windows``), shown as the generated ones were (``facts["repeat_frames"]`` times each frame). Returns
    {"metrics", "runs" (per-run values), "protocol" (the record)}.
    """
    protocol = get_protocol(protocol_name)
    n, frames, repeat = len(generated["full"]) // runs, facts["frames"], facts.get("repeat_frames", 1)
    split = lambda feats: [feats[r * n:(r + 1) * n] for r in range(runs)]   # noqa: E731
    name = f"{frames}" if repeat == 1 else f"{frames}x{repeat}"
    metrics, per_run = fvd_kvd(real_of(frames, False), split(generated["full"]), protocol, name)
    variants = {name: "whole samples vs whole real clips" + (f", every frame shown {repeat} times on both sides"
                                                              if repeat > 1 else "")}
    if "windows" in generated:
        windows = generated["windows"]   # [N, W, 400]
        pooled = [p.reshape(-1, windows.shape[-1]) for p in split(windows)]
        m, r = fvd_kvd(real_of(frames, True), pooled, protocol, "16_sliding_pooled")
        metrics.update(m), per_run.update(r)
        real16 = real_of(WINDOW, False)
        for s in official_starts(frames):
            m, r = fvd_kvd(real16, split(windows[:, s // STRIDE]), protocol, f"16_start{s}")
            metrics.update(m), per_run.update(r)
        for kind in ("fvd", "kvd"):
            starts = [metrics[f"{kind}16_start{s}"] for s in official_starts(frames)]
            metrics[f"{kind}16_sliding_mean"] = float(np.mean(starts))
        variants.update({
            "16_sliding_pooled": f"{WINDOW}-frame windows every {STRIDE} frames, all pooled, vs the same windows of "
                                 "the real clips",
            "16_start{s}": f"official sliding FVD: the window at start s vs real {WINDOW}-frame clips, "
                           f"s in range(0, {frames - WINDOW}, {STRIDE})",
            "16_sliding_mean": "mean of the 16_start{s} values"})
    return {"metrics": metrics, "runs": per_run,
            "protocol": record(protocol, i3d.network, generated_per_run=n, runs=runs, variants=variants, **facts)}
