"""Single-process MeBT training on procedural code grids: the smoke job of `mebt train`.

Reads top to bottom: build config -> data -> model -> optimizer -> resume -> loop -> evaluate. Everything a
restart needs (step, RNG, model, optimizer) is in one checkpoint written atomically, so a killed run that
is started again continues exactly where it stopped.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from data_pipeline.synthetic_codes import SyntheticCodesConfig, is_plausible, make_code_grids, uses_data_palette
from mebt.checkpoint import atomic_save
from mebt.config import ConfigError, check_at_least, to_dict
from mebt.model import MeBT, MeBTConfig
from mebt.objective import ObjectiveConfig, chunked_masked_loss, masked_loss, param_groups, sample_masks
from mebt.sampling import SamplingConfig, sample


@dataclass
class OptimConfig:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.01
    grad_clip: float = 1.0

    def __post_init__(self):
        if self.lr <= 0:
            raise ConfigError(f"config key 'lr' must be positive, got {self.lr}")


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 16
    log_every: int = 25
    ckpt_every: int = 100
    eval_samples: int = 16       # grids sampled at the end to check learned structure
    seed: int = 0
    device: str = "auto"         # auto | cpu | cuda
    run_dir: str = "runs/tiny"

    def __post_init__(self):
        check_at_least(self, ("steps", "batch_size", "log_every", "ckpt_every"), 1)
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"config key 'device' must be auto, cpu or cuda[:N], got {self.device!r}")


@dataclass
class RunConfig:
    model: MeBTConfig = field(default_factory=MeBTConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    data: SyntheticCodesConfig = field(default_factory=SyntheticCodesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class TrainState:
    step: int = 0
    gen: torch.Generator = field(default_factory=torch.Generator)   # draws batches and masks
    losses: list[float] = field(default_factory=list)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"config key 'train.device' is {name!r} but no CUDA device is available (use cpu or auto)")
    return torch.device(name)


def save_checkpoint(path: Path, model, optimizer, state: TrainState, cfg: RunConfig) -> None:
    # Atomic: a crash mid-write leaves the previous checkpoint intact.
    atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": state.step,
                 "rng": state.gen.get_state(), "losses": state.losses, "config": to_dict(cfg)}, path)


def evaluate(model, cfg: RunConfig, held_out: torch.Tensor, device) -> dict:
    """Accuracy at a 50% mask on held-out grids, and how many sampled grids follow the data's rules
    (``sample_palette``: one background and one object code throughout; ``sample_plausible``: also one
    same-size square per frame).

    ``majority_acc1`` predicts each grid's most frequent observed code everywhere: a model that has learned
    only the background scores about that, one that tracks the moving object scores clearly above it.
    """
    model.eval()
    g = torch.Generator().manual_seed(cfg.train.seed + 1)
    n = held_out[0].numel()
    perm = torch.rand(len(held_out), n, generator=g).argsort(dim=1).to(device)
    ctx, tgt = perm[:, : n // 2], perm[:, n // 2:]
    codes = held_out.flatten(1).to(device)
    with torch.no_grad():
        loss, metrics = masked_loss(model(codes, ctx, tgt), codes, tgt)
        majority = codes.gather(1, ctx).mode(dim=1).values
        majority_acc = (codes.gather(1, tgt) == majority[:, None]).float().mean()
    gen = torch.Generator(device=device).manual_seed(cfg.train.seed)
    grids = sample(model, cfg.sampling, cfg.train.eval_samples, generator=gen).cpu()
    grids = grids.view(-1, *cfg.model.latent_shape)
    model.train()
    return {"heldout_loss": loss.item(), "heldout_acc1": metrics["acc1"], "majority_acc1": majority_acc.item(),
            "sample_palette": sum(uses_data_palette(x, cfg.model.vocab_size) for x in grids) / len(grids),
            "sample_plausible": sum(is_plausible(x) for x in grids) / len(grids)}


def train(cfg: RunConfig) -> dict:
    tc = cfg.train
    device = pick_device(tc.device)
    run_dir = Path(tc.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    data = make_code_grids(cfg.data, cfg.model.latent_shape, cfg.model.vocab_size)
    n_eval = max(len(data) // 10, 1)
    train_set, held_out = data[n_eval:], data[:n_eval]
    if len(train_set) < 1:
        raise ConfigError("config key 'data.num_samples' is too small: need at least 2 grids (train + held-out)")

    torch.manual_seed(tc.seed)
    model = MeBT(cfg.model).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=cfg.optim.betas)
    state = TrainState()
    state.gen.manual_seed(tc.seed)

    ckpt_path = run_dir / "checkpoint.pt"
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        state = TrainState(step=ckpt["step"], losses=ckpt["losses"])
        state.gen.set_state(ckpt["rng"])
        print(f"resumed from {ckpt_path} at step {state.step}")

    print(f"MeBT {model.num_params() / 1e6:.2f}M params on {device}, grid {list(cfg.model.latent_shape)}, "
          f"vocab {cfg.model.vocab_size}, {len(train_set)} training grids")
    bar = tqdm(range(state.step, tc.steps), initial=state.step, total=tc.steps, desc="train", unit="step")
    t0 = time.perf_counter()
    for step in bar:
        pick = torch.randint(0, len(train_set), (tc.batch_size,), generator=state.gen)
        codes = train_set[pick].flatten(1).to(device)
        masks = sample_masks(cfg.objective, tc.batch_size, cfg.model.latent_shape, step, state.gen)
        tgt_idx = masks.tgt_idx.to(device)
        features = model.features(codes, masks.ctx_idx.to(device), tgt_idx)
        loss, metrics = chunked_masked_loss(features, model.head, codes, tgt_idx, cfg.objective.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()

        state.step = step + 1
        state.losses.append(loss.item())
        if state.step % tc.log_every == 0:
            bar.set_postfix(loss=f"{state.losses[-1]:.3f}", acc1=f"{metrics['acc1']:.3f}")
        if state.step % tc.ckpt_every == 0 or state.step == tc.steps:
            save_checkpoint(ckpt_path, model, optimizer, state, cfg)
    bar.close()

    result = {"step": state.step, "final_loss": state.losses[-1] if state.losses else None,
              "train_seconds": round(time.perf_counter() - t0, 2), **evaluate(model, cfg, held_out, device)}
    (run_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result
