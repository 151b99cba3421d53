"""Training the VQGAN video tokenizer: the job behind `mebt tokenizer train`.

Reads top to bottom: config -> data split -> model (+ optional discriminators) -> resume -> loop -> PSNR ->
``run_dir/tokenizer.ckpt``. The loss is TATS's without LPIPS: ``recon_weight`` x L1 (or MSE) reconstruction +
0.25 x commitment, the codebook follows by EMA with dead-code restarts, and optionally hinge-loss 2D
(random frame) and 3D (clip) patch discriminators after ``disc_start`` steps. Everything a restart needs
(step, model, optimizers, RNG, loss history) is written atomically to ``run_dir/tokenizer_last.ckpt``
every ``ckpt_every`` steps; starting the same run again continues exactly where it stopped.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from data_pipeline.video import ClipConfig, VideoClipDataset
from mebt.config import check_at_least, refuse_changed_settings, to_dict
from mebt.core.model_file import atomic_save
from mebt.errors import ConfigError
from mebt.fsutil import seed_everything, write_json, write_text
from mebt.logs import ensure_logging
from mebt.tokenizer.checkpoint import save_tokenizer
from mebt.tokenizer.vqgan import VQGAN, VQGANConfig
from mebt.train.distributed import pick_device
from mebt.train.optim import OptimConfig, tokenizer_optim

RESUME_FORMAT = "mebt-tokenizer-train-v1"

log = logging.getLogger(__name__)


@dataclass
class TokenizerLossConfig:
    recon_loss: Literal["l1", "mse"] = "l1"   # TATS: l1; mse optimises PSNR directly
    recon_weight: float = 4.0       # TATS's l1_weight
    image_gan_weight: float = 0.0   # 2D patch discriminator on one random frame per clip; 0 = off
    video_gan_weight: float = 0.0   # 3D patch discriminator on the clip; 0 = off
    disc_start: int = 0             # first step with adversarial terms (TATS: discriminator_iter_start)
    disc_channels: int = 64
    disc_layers: int = 3
    perceptual_weight: float = 0.0  # LPIPS: not implemented, must stay 0

    def __post_init__(self):
        check_at_least(self, ("recon_weight", "image_gan_weight", "video_gan_weight", "disc_start"), 0)
        check_at_least(self, ("disc_channels", "disc_layers"), 1)
        if self.perceptual_weight != 0:
            raise ConfigError(f"config key 'perceptual_weight' must be 0, got {self.perceptual_weight}: the LPIPS "
                              "perceptual loss (pretrained VGG weights) is not supported yet")


@dataclass
class TokenizerLoopConfig:
    steps: int = 2000
    batch_size: int = 8
    log_every: int = 10
    ckpt_every: int = 100
    eval_every: int = 0             # PSNR on the held-out clips every N steps; 0 = only at start and end
    eval_clips: int = 8             # held out from the training set when no evaluation set is given
    num_workers: int = 0            # DataLoader workers (video decoding)
    seed: int = 0
    device: str = "auto"            # auto | cpu | cuda[:N]
    run_dir: str = "runs/tokenizer"

    def __post_init__(self):
        check_at_least(self, ("steps", "batch_size", "log_every", "ckpt_every", "eval_clips"), 1)
        check_at_least(self, ("eval_every", "num_workers", "seed"), 0)


@dataclass
class TokenizerTrainConfig:
    model: VQGANConfig = field(default_factory=VQGANConfig)
    loss: TokenizerLossConfig = field(default_factory=TokenizerLossConfig)
    optim: OptimConfig = field(default_factory=tokenizer_optim)   # MeBT's optim section, TATS's Adam defaults
    train: TokenizerLoopConfig = field(default_factory=TokenizerLoopConfig)


class PatchDiscriminator(nn.Module):
    """PatchGAN: kernel-4 convs halving the size ``layers`` times, then per-patch real/fake logits.

    ``dims`` 2 judges single frames [B, C, H, W], 3 judges clips [B, C, T, H, W]."""

    def __init__(self, channels: int, width: int, layers: int, dims: int):
        super().__init__()
        conv, norm = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv3d, nn.BatchNorm3d)
        mods, ch = [conv(channels, width, 4, 2, 1), nn.LeakyReLU(0.2)], width
        for i in range(1, layers + 1):
            out = min(width * 2 ** i, 512)
            mods += [conv(ch, out, 4, 2 if i < layers else 1, 1), norm(out), nn.LeakyReLU(0.2)]
            ch = out
        mods.append(conv(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, x):
        return self.net(x)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[tuple[int, int]]:
    """(index, epoch) of each item of batch ``step``: consecutive slices of a fresh permutation per epoch.

    A pure function of the step, so a resumed run draws exactly the batches the interrupted one would have."""
    out, perms = [], {}
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch = pos // n
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append((int(perms[epoch][pos % n]), epoch))
    return out


class EpochItems(Dataset):
    """Fetches (index, epoch) keys: sets the epoch of a data set that has ``set_epoch`` (VideoClipDataset
    draws a new random clip per video and epoch) inside whichever process loads the item, then the item."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self.inner = dataset.dataset if isinstance(dataset, Subset) else dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)
        return self.dataset[index]


class StepBatches(torch.utils.data.Sampler):
    def __init__(self, n: int, batch_size: int, seed: int, first: int, last: int):
        self.n, self.batch_size, self.seed, self.first, self.last = n, batch_size, seed, first, last

    def __len__(self):
        return self.last - self.first

    def __iter__(self):
        return (batch_indices(s, self.batch_size, self.n, self.seed) for s in range(self.first, self.last))


def psnr_per_clip(recon: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of [0, 1] pixels (peak 1) for each clip; inputs in [-0.5, 0.5], recon is clamped first."""
    mse = (recon.clamp(-0.5, 0.5) - video).pow(2).flatten(1).mean(1)
    return -10 * torch.log10(mse.clamp_min(1e-10))


@torch.no_grad()
def evaluate(model: VQGAN, loader: DataLoader, device) -> dict:
    """Mean PSNR of encode -> decode (the tokenizer path, codebook frozen) and the share of codes used."""
    was_training = model.training
    model.eval()
    psnrs, used = [], torch.zeros(model.cfg.n_codes, dtype=torch.bool)
    for batch in loader:
        video = batch["video"].to(device)
        codes = model.encode(video)
        psnrs.append(psnr_per_clip(model.decode(codes), video).cpu())
        used[codes.flatten().cpu()] = True
    model.train(was_training)
    return {"psnr": torch.cat(psnrs).mean().item(), "codes_used": used.float().mean().item()}


def split_data(dataset: Dataset, eval_dataset: Dataset | None, eval_clips: int) -> tuple[Dataset, Dataset]:
    if eval_dataset is not None:
        return dataset, eval_dataset
    if len(dataset) <= eval_clips:
        raise ConfigError(f"config key 'train.eval_clips' ({eval_clips}) leaves no training clips out of "
                          f"{len(dataset)}; lower it or pass a separate evaluation set")
    n = len(dataset) - eval_clips
    return Subset(dataset, range(n)), Subset(dataset, range(n, len(dataset)))


def check_clip_shape(cfg: TokenizerTrainConfig, video: torch.Tensor) -> None:
    m = cfg.model
    if video.dim() != 4 or video.shape[0] != m.image_channels:
        raise ConfigError(f"dataset items must have 'video' [{m.image_channels}, T, H, W], got {list(video.shape)}")
    if any(s % d for s, d in zip(video.shape[1:], m.downsample)):
        raise ConfigError(f"config key 'model.downsample' {list(m.downsample)} must divide the clips' T, H, W "
                          f"{list(video.shape[1:])}")


def build_discriminators(cfg: TokenizerTrainConfig, clip_shape, device) -> nn.ModuleDict:
    """The enabled discriminators; each is first tried on the meta device, so too many layers for the clip
    size fail with a clear line instead of a conv error mid-training."""
    lc, ch = cfg.loss, cfg.model.image_channels
    weights = {"image": (2, lc.image_gan_weight), "video": (3, lc.video_gan_weight)}
    wanted = {name: dims for name, (dims, weight) in weights.items() if weight > 0}
    for name, dims in wanted.items():
        shape = clip_shape[-dims:]
        try:
            with torch.device("meta"):
                PatchDiscriminator(ch, lc.disc_channels, lc.disc_layers, dims)(torch.empty(2, ch, *shape))
        except RuntimeError:
            raise ConfigError(f"config key 'loss.disc_layers' ({lc.disc_layers}) is too many for {name} inputs of "
                              f"size {list(shape)}; lower it") from None
    return nn.ModuleDict({name: PatchDiscriminator(ch, lc.disc_channels, lc.disc_layers, dims)
                          for name, dims in wanted.items()}).to(device)


def adversarial_losses(discs: nn.ModuleDict, cfg: TokenizerLossConfig, video, recon) -> tuple[torch.Tensor, Callable]:
    """Generator loss now, and a closure giving the discriminators' hinge loss on detached inputs.

    The image discriminator judges one random frame per clip (the same frame for real and fake)."""
    b, t = video.shape[0], video.shape[2]
    frame = torch.randint(t, (b,), device=video.device)

    def pick(x):  # [B, C, T, H, W] -> [B, C, H, W]
        return x[torch.arange(b, device=x.device), :, frame]
    pairs = {"image": (pick(video), pick(recon), cfg.image_gan_weight),
             "video": (video, recon, cfg.video_gan_weight)}
    g_loss = sum(-w * discs[k](fake).mean() for k, (_, fake, w) in pairs.items() if k in discs)

    def d_loss():
        return sum(w * hinge_d_loss(discs[k](real), discs[k](fake.detach()))
                   for k, (real, fake, w) in pairs.items() if k in discs)
    return g_loss, d_loss


def train_step(model: VQGAN, discs: nn.ModuleDict, opt, d_opt, cfg: TokenizerTrainConfig, video: torch.Tensor,
               step: int) -> dict:
    """One update of the tokenizer (and, once adversarial terms are on, of the discriminators); plain floats."""
    for group in opt.param_groups + (d_opt.param_groups if d_opt else []):
        group["lr"] = cfg.optim.lr_at(step, cfg.train.steps)
    recon, parts = model(video)
    recon_loss = parts["recon_loss"] if cfg.loss.recon_loss == "l1" else F.mse_loss(recon, video)
    loss = cfg.loss.recon_weight * recon_loss + parts["commitment_loss"]
    adversarial = bool(discs) and step >= cfg.loss.disc_start
    if adversarial:
        g_loss, d_loss_fn = adversarial_losses(discs, cfg.loss, video, recon)
        loss = loss + g_loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.optim.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    opt.step()
    logs = {"loss": loss.item(), "rec": recon_loss.item(), "commit": parts["commitment_loss"].item(),
            "ppl": parts["perplexity"].item()}
    if adversarial:
        d_opt.zero_grad(set_to_none=True)  # also drops what the generator loss left on them
        d_loss = d_loss_fn()
        d_loss.backward()
        d_opt.step()
        logs.update(g=g_loss.item(), d=d_loss.item())
    return logs


def _config_clash(saved: dict, cfg: TokenizerTrainConfig, run_dir: Path) -> None:
    """Refuse to resume a checkpoint trained with another model or loss (changing train.* is fine)."""
    current = to_dict(cfg)
    refuse_changed_settings(f"'{run_dir}/tokenizer_last.ckpt' was trained with another model or loss",
                            {k: saved.get(k, {}) for k in ("model", "loss")},
                            {k: current[k] for k in ("model", "loss")}, "use another train.run_dir or the saved values")


def train_tokenizer(cfg: TokenizerTrainConfig, dataset: Dataset, eval_dataset: Dataset | None = None) -> dict:
    """Train (or resume) a VQGAN on ``dataset`` items {"video": float [C, T, H, W] in [-0.5, 0.5]}.

    PSNR is measured on ``eval_dataset``, or on the last ``train.eval_clips`` items of ``dataset`` which
    are then not trained on. Writes ``run_dir/tokenizer.ckpt`` (loadable by ``load_tokenizer``) and
    ``run_dir/tokenizer_metrics.json``; returns the metrics (with the per-step loss history).
    """
    ensure_logging()
    tc = cfg.train
    device = pick_device(tc.device)
    run_dir = Path(tc.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    train_set, eval_set = split_data(dataset, eval_dataset, tc.eval_clips)
    first = train_set[0]["video"]
    check_clip_shape(cfg, first)
    clip_shape = tuple(first.shape[1:])

    seed_everything(tc.seed)
    model = VQGAN(cfg.model).to(device).train()
    discs = build_discriminators(cfg, clip_shape, device)
    oc = cfg.optim
    opt = oc.adamw(model.parameters())
    d_opt = oc.adamw(discs.parameters()) if discs else None
    eval_loader = DataLoader(eval_set, batch_size=tc.batch_size, num_workers=tc.num_workers)

    last_path = run_dir / "tokenizer_last.ckpt"
    step, losses, psnr_start = 0, [], None
    if last_path.exists():
        ckpt = torch.load(last_path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or ckpt.get("format") != RESUME_FORMAT:
            raise ConfigError(f"'{last_path}' is not a tokenizer training checkpoint (format {RESUME_FORMAT!r}); "
                              "use another train.run_dir or remove the file")
        _config_clash(ckpt["config"], cfg, run_dir)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        if discs:
            discs.load_state_dict(ckpt["discriminators"])
            d_opt.load_state_dict(ckpt["disc_optimizer"])
        torch.set_rng_state(ckpt["rng"])
        if device.type == "cuda" and ckpt["cuda_rng"] is not None:
            torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
        step, losses, psnr_start = ckpt["step"], ckpt["losses"], ckpt["psnr_start"]
        log.info(f"resumed from {last_path} at step {step}")
    else:
        write_text(run_dir / "tokenizer_config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        psnr_start = evaluate(model, eval_loader, device)["psnr"]

    def save_resume_state():
        cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        atomic_save({"format": RESUME_FORMAT, "step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                     "discriminators": discs.state_dict(), "disc_optimizer": d_opt.state_dict() if d_opt else {},
                     "rng": torch.get_rng_state(), "cuda_rng": cuda_rng, "losses": losses, "psnr_start": psnr_start,
                     "config": to_dict(cfg)}, last_path)

    log.info(f"VQGAN {model.num_params() / 1e6:.2f}M params on {device}, clips {list(clip_shape)} -> codes "
             f"{list(model.latent_shape(*clip_shape))} of {cfg.model.n_codes}, {len(train_set)} training clips, "
             f"held-out PSNR {psnr_start:.2f} dB at start")
    # Own generator: the DataLoader must not draw from the global RNG, or a resumed run would diverge.
    batches = StepBatches(len(train_set), tc.batch_size, tc.seed, step, tc.steps)
    loader = DataLoader(EpochItems(train_set), batch_sampler=batches, num_workers=tc.num_workers,
                        generator=torch.Generator().manual_seed(tc.seed))
    bar = tqdm(loader, initial=step, total=tc.steps, desc="tokenizer", unit="step")
    t0 = time.perf_counter()
    for batch in bar:
        logs = train_step(model, discs, opt, d_opt, cfg, batch["video"].to(device), step)
        step += 1
        losses.append(logs.pop("loss"))
        if step % tc.log_every == 0:
            bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items()})
        if tc.eval_every and step % tc.eval_every == 0:
            log.info(f"step {step}: held-out PSNR {evaluate(model, eval_loader, device)['psnr']:.2f} dB")
        if step % tc.ckpt_every == 0 or step == tc.steps:
            save_resume_state()
    bar.close()

    metrics = evaluate(model, eval_loader, device)
    result = {"step": step, "psnr_start": psnr_start, **metrics,
              "final_loss": losses[-1] if losses else None, "train_seconds": round(time.perf_counter() - t0, 2),
              "eval_clips": len(eval_set), "clip_shape": list(clip_shape), "tokenizer": str(run_dir / "tokenizer.ckpt")}
    save_tokenizer(model, run_dir / "tokenizer.ckpt", extra={"step": step, "psnr": metrics["psnr"],
                                                              "clip_shape": list(clip_shape)})
    write_json(run_dir / "tokenizer_metrics.json", result)
    print(json.dumps(result, indent=2))
    return {**result, "losses": list(losses)}


@dataclass
class TokenizerDataConfig:
    root: str = "data/synth"             # videos (with train.txt/test.txt) or frame folders
    train_split: str = "train"
    eval_split: str | None = "test"      # held-out videos for PSNR; None: the last train.eval_clips clips
    clip: ClipConfig = field(default_factory=ClipConfig)


@dataclass
class TokenizerRunConfig(TokenizerTrainConfig):
    """What `mebt tokenizer train --config X` reads: the training config plus where the videos are."""
    data: TokenizerDataConfig = field(default_factory=TokenizerDataConfig)


def train_tokenizer_on_videos(cfg: TokenizerRunConfig) -> dict:
    """``train_tokenizer`` on random clips of the videos in ``cfg.data`` (held-out split for PSNR)."""
    data = cfg.data
    train_set = VideoClipDataset(data.root, data.train_split, data.clip, seed=cfg.train.seed)
    eval_set = VideoClipDataset(data.root, data.eval_split, data.clip, seed=cfg.train.seed + 1) if data.eval_split else None
    return train_tokenizer(cfg, train_set, eval_set)
