"""The typed configuration of a training run, and the DeepSpeed config generated from it.

A run is ``RunConfig``: one section per component (YAML files in ``configs/`` merge into it, dotted CLI
overrides are validated). The DeepSpeed JSON is never written by hand: ``deepspeed_config`` derives it
from these sections, and ``deepspeed.extra`` may add raw DeepSpeed keys as long as they do not contradict
a generated one (the typed key wins the argument by refusing the run, naming the key to use instead).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

from data_pipeline.elastic import adapt_layout
from data_pipeline.loader import LoaderConfig
from mebt.config import check_at_least
from mebt.core.model import MeBT, MeBTConfig
from mebt.core.objective import ObjectiveConfig
from mebt.core.sampling import SamplingConfig
from mebt.errors import ConfigError
from mebt.train.optim import OptimConfig
from mebt.train.tracking import MLflowConfig

log = logging.getLogger(__name__)


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_accum: int = 1                  # micro-batches per optimizer step
    offload_optimizer: bool = False      # optimizer states (and the step) in CPU memory
    offload_param: bool = False          # parameters in CPU memory (ZeRO-3 only)
    extra: dict = field(default_factory=dict)   # raw DeepSpeed keys merged into the generated config

    def __post_init__(self):
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"config key 'zero_stage' must be 0, 1, 2 or 3, got {self.zero_stage}")
        check_at_least(self, ("grad_accum",), 1)
        if self.offload_param and self.zero_stage != 3:
            raise ConfigError("config key 'offload_param' needs zero_stage 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError("config key 'offload_optimizer' needs zero_stage 1, 2 or 3")


@dataclass
class TrainConfig:
    steps: int = 1000                    # optimizer steps
    global_batch_size: int | None = None  # if set, must equal data.batch_size x grad_accum x processes
    log_every: int = 10
    ckpt_every: int = 500
    keep_last: int = 2                   # checkpoints kept in run_dir/checkpoints
    sample_every: int = 0                # sample (and decode, with a tokenizer) every N steps; 0: only at the end
    num_samples: int = 4                 # videos per sampling round
    tokenizer: str | None = None         # VQGAN checkpoint to decode samples into MP4/GIF; default: the dataset's
    seed: int = 0
    deterministic: bool = False          # deterministic kernels (torch.use_deterministic_algorithms)
    device: str = "auto"                 # auto | cpu | cuda
    run_dir: str = "runs/mebt"
    trace: bool = False                  # write every step's loss and sample keys per rank (run_dir/trace)

    def __post_init__(self):
        check_at_least(self, ("steps", "log_every", "ckpt_every", "keep_last", "num_samples"), 1)
        check_at_least(self, ("sample_every", "seed"), 0)
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"config key 'device' must be auto, cpu or cuda[:N], got {self.device!r}")


def defaults_from_dataset(data: dict) -> dict:
    """What a merged config dict (before the dataclass is built) leaves out and the dataset's
    ``dataset.json`` knows: ``model.latent_shape`` and ``model.vocab_size`` (its code grid and codebook), so
    a new dataset trains without restating them, and ``train.tokenizer`` (the tokenizer that made the
    codes, when that file is still there with the recorded sha256), so samples are decoded into videos.
    Explicit values stay and are checked against the dataset when the loader opens it (every mismatch in
    one line)."""
    data_dir = (data.get("data") or {}).get("data_dir")
    model, train = data.get("model") or {}, data.get("train") or {}
    if not data_dir or ("latent_shape" in model and "vocab_size" in model and "tokenizer" in train):
        return data
    from data_pipeline.sources import read_dataset_info

    try:
        info = read_dataset_info(data_dir, (data.get("data") or {}).get("meta_dir"))
    except Exception:   # no dataset (yet) or not a local one: the loader says what is wrong when training starts
        return data
    crop = (data.get("data") or {}).get("crop_frames")
    grid = info.get("grid")
    model, train = dict(model), dict(train)
    if "latent_shape" not in model and grid:
        model["latent_shape"] = [crop or grid[0], *grid[1:]]
    if "vocab_size" not in model and info.get("codebook_size"):
        model["vocab_size"] = info["codebook_size"]
    if "tokenizer" not in train and _same_tokenizer(info):
        train["tokenizer"] = info["tokenizer"]
    return {**data, "model": model, "train": train}


def _same_tokenizer(info: dict) -> bool:
    """The tokenizer file a dataset recorded still exists and is the one that made its codes."""
    path = info.get("tokenizer")
    if not path or not Path(path).is_file() or not info.get("tokenizer_sha256"):
        return False
    from mebt.tokenizer.checkpoint import tokenizer_sha256

    return tokenizer_sha256(path) == info["tokenizer_sha256"]


@dataclass
class RunConfig:
    data: LoaderConfig | None = None     # required: the dataset directory and the micro-batch per process
    model: MeBTConfig = field(default_factory=MeBTConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    # Resume despite a change to these keys (mebt.train.resume_config; each change is recorded in the run).
    allow_config_change: list[str] = field(default_factory=list)
    resume_from: str | None = None       # a checkpoint tag (global_stepN) to resume from; default: latest
    resume_fallback: bool = False        # latest broken (a file missing or cut short): resume the last complete one

    def __post_init__(self):
        if self.resume_from is not None and not re.fullmatch(r"global_step\d+", self.resume_from):
            raise ConfigError(f"--resume-from must name a checkpoint tag such as global_step500, got "
                              f"{self.resume_from!r}")
        if self.data is None:
            raise ConfigError("config key 'data.data_dir' is not set; point it at a directory made by mebt "
                              "preprocess or mebt data synth-codes")


def grad_accum(cfg: RunConfig, world_size: int) -> int:
    """Micro-batches per step: from train.global_batch_size when set (checked to divide), else the config's."""
    per_step = cfg.data.batch_size * world_size
    wanted = cfg.train.global_batch_size
    if wanted is None:
        return cfg.deepspeed.grad_accum
    if wanted % per_step:
        raise ConfigError(f"train.global_batch_size {wanted} is not a multiple of data.batch_size x processes "
                          f"({cfg.data.batch_size} x {world_size} = {per_step}); change one of them")
    if cfg.deepspeed.grad_accum not in (1, wanted // per_step):
        raise ConfigError(f"deepspeed.grad_accum {cfg.deepspeed.grad_accum} contradicts train.global_batch_size "
                          f"{wanted} (= {cfg.data.batch_size} x {world_size} x {wanted // per_step}); set only one")
    return wanted // per_step


def saved_global_batch(meta: dict) -> int:
    """Clips per step of a checkpoint (``mebt.json``): recorded, or for older checkpoints worked out from
    the config and process count it was saved with."""
    if meta.get("global_batch"):
        return int(meta["global_batch"])
    saved, world = meta["config"], int(meta["world_size"])
    per_step = saved["data"]["batch_size"] * world
    wanted = saved["train"].get("global_batch_size")
    return wanted if wanted else per_step * saved["deepspeed"]["grad_accum"]


def elastic_layout(cfg: RunConfig, saved: dict | None, world_size: int) -> RunConfig:
    """The config whose batch layout this start uses: ``cfg``, or when resuming a checkpoint (``saved``:
    its ``mebt.json``) whose clips per step ``cfg`` would change on ``world_size`` processes, ``cfg`` with a
    micro-batch (at most ``data.batch_size``) and accumulation that keep them. The run's own config (what
    checkpoints record and resumes compare) stays ``cfg``."""
    if saved is None:
        return cfg
    wanted = saved_global_batch(saved)
    try:
        if cfg.data.batch_size * grad_accum(cfg, world_size) * world_size == wanted:
            return cfg
    except ConfigError:
        pass   # train.global_batch_size does not divide on these processes: adapt below
    fit = adapt_layout(wanted, world_size, cfg.data.batch_size)
    if fit is None:
        divisors = [w for w in range(1, wanted + 1) if wanted % w == 0]
        raise ConfigError(f"the checkpoint of '{cfg.train.run_dir}' trains {wanted} clips per step, which {world_size} "
                          f"processes cannot share evenly; resume on a process count that divides {wanted} "
                          f"({', '.join(map(str, divisors[-6:]))}, ...) or start a new train.run_dir")
    micro, accum = fit
    log.info(f"resuming a {saved['world_size']}-process checkpoint on {world_size} process(es): {wanted} clips per "
             f"step as {world_size} x {accum} micro-batch(es) x {micro} clips")
    return replace(cfg, data=replace(cfg.data, batch_size=micro), deepspeed=replace(cfg.deepspeed, grad_accum=accum),
                   train=replace(cfg.train, global_batch_size=wanted))


def _merge(base: dict, extra: dict, path: str = "") -> dict:
    out = dict(base)
    for key, value in extra.items():
        if key in base and isinstance(base[key], dict) and isinstance(value, dict):
            out[key] = _merge(base[key], value, f"{path}{key}.")
        elif key in base and base[key] != value:
            raise ConfigError(f"deepspeed.extra key '{path}{key}' ({value!r}) conflicts with the generated value "
                              f"{base[key]!r}; set it through {GENERATED_FROM.get(path + key, 'the typed config')}")
        else:
            out[key] = value
    return out


GENERATED_FROM = {
    "train_micro_batch_size_per_gpu": "data.batch_size", "gradient_accumulation_steps": "deepspeed.grad_accum",
    "train_batch_size": "train.global_batch_size", "gradient_clipping": "optim.grad_clip",
    "zero_optimization.stage": "deepspeed.zero_stage", "bf16.enabled": "deepspeed.precision",
    "fp16.enabled": "deepspeed.precision",
}


# Gradient buckets per backward pass (see zero_comm), and their bounds in elements.
BUCKETS_PER_STEP = 16
BUCKET_MIN, BUCKET_MAX = 2 ** 22, 5 * 10 ** 8


def zero_comm(stage: int, model: MeBTConfig) -> dict:
    """ZeRO communication settings chosen from the model size (documented rule in README, "ZeRO defaults").

    DeepSpeed's default bucket (5e8 elements) is larger than the 345M-parameter paper model, so nothing is
    reduced before the backward pass ends, and ``overlap_comm`` is off: at 32 GPUs ~1.3 GB per GPU per step
    then waits behind the compute. Here the gradients go in ~``BUCKETS_PER_STEP`` buckets of
    params/16 elements (clamped to [4M, 5e8]; one bucket for a small model), reduced while backward goes on
    (``overlap_comm``) from one contiguous buffer (``contiguous_gradients``, no fragmentation). ZeRO-3
    prefetches parameters in buckets of the same size and keeps parameters below 10 x n_embd elements
    (LayerNorms, biases) whole on every GPU rather than gathering them one by one.
    """
    if stage == 0:
        return {}
    bucket = int(min(BUCKET_MAX, max(BUCKET_MIN, model_params(model) // BUCKETS_PER_STEP)))
    out = {"overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": bucket,
           "allgather_bucket_size": bucket}
    if stage == 3:
        out.update(stage3_prefetch_bucket_size=bucket, stage3_param_persistence_threshold=10 * model.n_embd)
    return out


def model_params(model: MeBTConfig) -> int:
    """The model's parameter count, from a copy on the meta device (no memory, no initialisation)."""
    with torch.device("meta"):
        return MeBT(model).num_params()


def deepspeed_config(cfg: RunConfig, world_size: int, device_type: str) -> dict:
    """The DeepSpeed JSON config for this run on ``world_size`` processes (raises one-line ConfigErrors)."""
    ds = cfg.deepspeed
    if ds.precision == "fp16" and device_type != "cuda":
        raise ConfigError("deepspeed.precision fp16 needs CUDA devices; use bf16 or fp32 on CPU")
    accum = grad_accum(cfg, world_size)
    zero: dict = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    generated = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": cfg.data.batch_size * accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # A torch AdamW is passed in: DeepSpeed's fused/CPU Adam JIT-compile for minutes on first use.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2 ** 31 - 1,    # the trainer logs; DeepSpeed's own prints would repeat it
        "wall_clock_breakdown": False,
    }
    merged = _merge(generated, ds.extra)
    for key, value in zero_comm(ds.zero_stage, cfg.model).items():   # defaults: deepspeed.extra may set them
        merged["zero_optimization"].setdefault(key, value)
    return merged
