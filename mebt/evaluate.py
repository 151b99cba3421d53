"""Offline evaluation: sample videos from a checkpoint, decode them, score them with FVD/KVD (`mebt eval`).

``evaluate(cfg)`` reads top to bottom: model + tokenizer -> sample and decode this process's batches
(each batch is a file; batches already on disk are kept, so an interrupted evaluation resumes) -> I3D
features of the samples -> real-video features (cached on disk, keyed by dataset, split, clip settings,
count, seed and I3D weights) -> FVD/KVD -> ``report.json`` + an MP4/GIF grid of samples -> the
metrics logged into the training run's MLflow run at the checkpoint's step. Batches are seeded by their
index, so several processes (``shard_index``/``num_shards``) each sample a slice and the result does
not depend on how the work was split or resumed.
"""
from __future__ import annotations

import functools
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mebt.checkpoint import file_sha256, load_model_with_extras
from mebt.config import ConfigError, UserError
from mebt.distributed import pick_device
from mebt.media import tile, to_uint8, write_formats
from mebt.sampling import SamplingConfig, sample


@dataclass
class EvalConfig:
    checkpoint: str                        # model file, run dir, checkpoints dir or checkpoints/global_stepN
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    out_dir: str | None = None             # default: RUN_DIR/eval/global_stepN, or MODEL.eval/
    tokenizer: str | None = None           # default: the run config's train.tokenizer
    num_samples: int = 256
    batch_size: int = 16
    frames: int | None = None              # score the first F decoded frames (default: all)
    i3d: str | None = None                 # i3d_pretrained_400.pt; without it no FVD/KVD
    real_dir: str | None = None            # videos (split files) for the real statistics
    real_split: str = "test"
    num_real: int = 256
    protocol: str = "float64"              # float64 (StyleGAN-V) or tats (TATS/MeBT papers)
    seed: int = 0
    shard_index: int = 0
    num_shards: int = 1
    cache_dir: str = str(Path.home() / ".cache" / "mebt" / "real_features")
    grid_samples: int = 8
    device: str = "auto"
    log_mlflow: bool = True

    def __post_init__(self):
        for key in ("num_samples", "batch_size", "num_real", "num_shards", "grid_samples"):
            if getattr(self, key) < 1:
                raise ConfigError(f"'{key}' must be >= 1, got {getattr(self, key)}")
        if not 0 <= self.shard_index < self.num_shards:
            raise ConfigError(f"shard index {self.shard_index} is outside 0..{self.num_shards - 1}")
        from mebt.fvd import PROTOCOLS

        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")


def load_for_eval(checkpoint: str | Path):
    """(model, info) from an exported model file or a training checkpoint.

    info: step, run config, run dir, MLflow run id and tag of the training checkpoint the weights come
    from (``mebt export`` records them in the file; files from elsewhere have none of them).
    """
    path = Path(checkpoint)
    if path.is_file():
        model, extras = load_model_with_extras(path)
        source = Path(extras["source"]) if "source" in extras else None
        return model, {"step": extras.get("step", 0),
                       "config": json.loads(extras["run_config"]) if "run_config" in extras else None,
                       "run_dir": source.parent.parent if source else None,
                       "mlflow_run_id": extras.get("mlflow_run_id"), "tag": extras.get("tag", path.stem)}
    from mebt.train_checkpoint import consolidated_model

    model, meta, tag_dir = consolidated_model(path)
    return model, {"step": meta["step"], "config": meta["config"], "run_dir": tag_dir.parent.parent,
                   "mlflow_run_id": meta.get("mlflow_run_id"), "tag": tag_dir.name}


def eval_dir(cfg: EvalConfig, info: dict) -> Path:
    """Where an evaluation writes: ``out_dir``, else MODEL_FILE.eval/, else RUN_DIR/eval/global_stepN/."""
    if cfg.out_dir:
        return Path(cfg.out_dir)
    if Path(cfg.checkpoint).is_file():
        return Path(str(cfg.checkpoint) + ".eval")
    return Path(info["run_dir"]) / "eval" / info["tag"]


def _num_batches(cfg: EvalConfig) -> int:
    return -(-cfg.num_samples // cfg.batch_size)


def _batches(cfg: EvalConfig) -> list[int]:
    return [j for j in range(_num_batches(cfg)) if j % cfg.num_shards == cfg.shard_index]


def sample_batches(model, tokenizer, cfg: EvalConfig, out: Path, device) -> None:
    """This process's batches as ``samples/batch_J.npz`` (codes + uint8 video), skipping finished ones."""
    out.mkdir(parents=True, exist_ok=True)
    todo = [j for j in _batches(cfg) if not (out / f"batch_{j:05d}.npz").exists()]
    shape = model.cfg.latent_shape
    for j in tqdm(todo, desc="sampling + decoding", unit="batch"):
        n = min(cfg.batch_size, cfg.num_samples - j * cfg.batch_size)
        generator = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + j)
        with torch.no_grad():
            codes = sample(model, cfg.sampling, n, generator=generator).view(n, *shape)
            video = to_uint8(tokenizer.decode(codes).float().cpu())
        tmp = out / f".batch_{j:05d}.tmp.npz"
        np.savez(tmp, codes=codes.cpu().numpy().astype(np.int16), video=video)
        tmp.replace(out / f"batch_{j:05d}.npz")


def load_samples(cfg: EvalConfig, out: Path) -> np.ndarray | None:
    """uint8 [N, T, H, W, 3] of every batch, or None while some batch (another shard's) is missing."""
    files = [out / f"batch_{j:05d}.npz" for j in range(_num_batches(cfg))]
    if not all(f.exists() for f in files):
        return None
    return np.concatenate([np.load(f, allow_pickle=False)["video"] for f in files])


def real_clips(cfg: EvalConfig, frames: int, resolution: int) -> np.ndarray:
    """``num_real`` uint8 [T, H, W, 3] clips of real videos (random starts, seeded), decoded from the files."""
    from data_pipeline.video import ClipConfig, VideoClipDataset

    dataset = VideoClipDataset(cfg.real_dir, cfg.real_split, ClipConfig(sequence_length=frames, resolution=resolution),
                               seed=cfg.seed)
    clips = []
    epoch = 0
    with tqdm(total=cfg.num_real, desc="real clips", unit="clip") as bar:
        while len(clips) < cfg.num_real:   # one random clip per video per epoch, new starts each epoch
            dataset.set_epoch(epoch)
            for i in range(min(len(dataset), cfg.num_real - len(clips))):
                clips.append(to_uint8(dataset[i]["video"][None])[0])
                bar.update(1)
            epoch += 1
    return np.stack(clips)


def real_features(cfg: EvalConfig, i3d, i3d_sha256: str, frames: int, resolution: int, window: int | None,
                  device, decode) -> np.ndarray:
    """I3D features of the real clips (or of their sliding windows), cached on disk; ``decode()`` gives the
    clips on a cache miss."""
    from mebt.fvd import sliding_windows
    from mebt.i3d import i3d_features

    key = {"real_dir": str(Path(cfg.real_dir).resolve()), "split": cfg.real_split, "frames": frames,
           "resolution": resolution, "num_real": cfg.num_real, "seed": cfg.seed, "window": window,
           "i3d": i3d_sha256}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = Path(cfg.cache_dir) / f"{digest}.npy"
    if path.exists():
        return np.load(path, allow_pickle=False)
    clips = decode()
    if window:
        clips = sliding_windows(clips, window, window // 2)
    features = i3d_features(i3d, torch.from_numpy(clips), device=device, desc="I3D features (real)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, features, allow_pickle=False)
    tmp.replace(path)
    (path.with_suffix(".json")).write_text(json.dumps(key, indent=2))
    return features


def score(cfg: EvalConfig, videos: np.ndarray, i3d, device) -> dict:
    """FVD/KVD at the samples' full length, plus sliding 16-frame windows every 8 frames for long samples."""
    from mebt.fvd import KVD_PROTOCOL, PROTOCOLS, fvd, kvd, sliding_windows
    from mebt.i3d import i3d_features

    if cfg.frames:
        if cfg.frames > videos.shape[1]:
            raise UserError(f"--frames {cfg.frames} exceeds the {videos.shape[1]} frames the model generates")
        videos = videos[:, :cfg.frames]
    n, frames, resolution = len(videos), videos.shape[1], videos.shape[2]
    variants = [(f"{frames}", None)] + ([("16_sliding", 16)] if frames > 16 else [])
    i3d_sha256 = file_sha256(cfg.i3d)
    decode = functools.cache(lambda: real_clips(cfg, frames, resolution))   # once, and only on a cache miss
    metrics, protocol = {}, {"name": cfg.protocol, **PROTOCOLS[cfg.protocol], "generated": n,
                             "real": cfg.num_real, "real_dir": cfg.real_dir, "real_split": cfg.real_split,
                             "i3d_sha256": i3d_sha256, "frames": frames, "resolution": resolution,
                             "kvd": KVD_PROTOCOL, "sliding": "16-frame windows every 8 frames" if frames > 16 else None}
    for name, window in variants:
        fake = sliding_windows(videos, window, window // 2) if window else videos
        fake_features = i3d_features(i3d, torch.from_numpy(fake), device=device, desc="I3D features (generated)")
        real = real_features(cfg, i3d, i3d_sha256, frames, resolution, window, device, decode)
        metrics[f"fvd{name}"] = fvd(real, fake_features, protocol=cfg.protocol)
        metrics[f"kvd{name}"] = kvd(real, fake_features)
    return {"metrics": metrics, "protocol": protocol}


def write_grid(cfg: EvalConfig, videos: np.ndarray, out: Path) -> list[Path]:
    return write_formats(tile(videos[:cfg.grid_samples]), out / "samples_grid")


def log_to_mlflow(info: dict, report: dict, grid: list[Path]) -> str | None:
    """Metrics into the training run at the checkpoint's step; never fails the evaluation."""
    run_id, config = info.get("mlflow_run_id"), info.get("config") or {}
    if not run_id:
        return "no MLflow run recorded in the checkpoint"
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from mebt.tracking import tracking_uri

    uri = tracking_uri((config.get("mlflow") or {}).get("tracking_uri"), info["run_dir"])
    try:
        client = MlflowClient(uri)
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(f"eval/{k}", float(v), now, info["step"])
                                          for k, v in report["metrics"].items()])
        for path in grid:
            client.log_artifact(run_id, str(path), artifact_path=f"eval/{info['tag']}")
    except Exception as e:   # tracking must not lose an evaluation that took hours
        return f"MLflow logging failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    return None


def evaluate(cfg: EvalConfig) -> dict:
    device = pick_device(cfg.device)
    model, info = load_for_eval(cfg.checkpoint)
    model = model.to(device).eval()
    tokenizer_path = cfg.tokenizer or ((info["config"] or {}).get("train") or {}).get("tokenizer")
    if not tokenizer_path:
        raise UserError("mebt eval needs the tokenizer that made the shards to decode samples: pass --tokenizer")
    from mebt.vqgan_checkpoint import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path).to(device).eval()
    if tokenizer.cfg.n_codes != model.cfg.vocab_size:
        raise UserError(f"tokenizer '{tokenizer_path}' has {tokenizer.cfg.n_codes} codes, the model "
                        f"{model.cfg.vocab_size}; use the tokenizer the shards were made with")
    if cfg.i3d and not cfg.real_dir:
        raise UserError("FVD needs real videos: pass --real-dir (a video folder with split files) with --i3d")
    from mebt.i3d import load_i3d

    i3d = load_i3d(cfg.i3d).to(device) if cfg.i3d else None   # a missing weights file fails before sampling
    out = eval_dir(cfg, info)
    start = time.perf_counter()
    sample_batches(model, tokenizer, cfg, out / "samples", device)
    seconds_sampling = time.perf_counter() - start
    videos = load_samples(cfg, out / "samples")
    if videos is None:
        return {"complete": False, "out_dir": str(out), "message": "other shards' batches are missing; run again "
                                                                   "without --shard-index once they finish"}
    report = {"checkpoint": str(cfg.checkpoint), "step": info["step"], "num_samples": len(videos),
              "sampling": asdict(cfg.sampling), "seconds_sampling": round(seconds_sampling, 2),
              "metrics": {}, "protocol": None}
    if cfg.i3d:
        start = time.perf_counter()
        report.update(score(cfg, videos, i3d, device))
        report["seconds_metrics"] = round(time.perf_counter() - start, 2)
    else:
        report["note"] = "FVD/KVD skipped: no I3D weights given (--i3d i3d_pretrained_400.pt)"
    grid = write_grid(cfg, videos, out)
    report["mlflow"] = log_to_mlflow(info, report, grid) if cfg.log_mlflow and report["metrics"] else None
    report.update(complete=True, out_dir=str(out), grid=[str(p) for p in grid])
    tmp = out / ".report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out / "report.json")
    return report


def watch(run_dir: str | Path, make_config, poll_s: float = 30.0, max_evals: int | None = None) -> list[dict]:
    """Evaluate every checkpoint of a run once, as it appears, until stopped (Ctrl-C/SIGTERM) or
    ``max_evals``. The ``report.json`` in a checkpoint's ``eval_dir`` marks it as done, so a restarted
    watcher skips it; a checkpoint pruned by training before its turn is skipped with a message."""
    import signal

    from mebt.checkpoint import CheckpointError
    from mebt.train_checkpoint import CKPT_DIR, META, tag_dirs

    ckpt_dir = Path(run_dir) / CKPT_DIR
    reports: list[dict] = []
    stop = []
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    print(f"mebt eval: watching {run_dir} every {poll_s:g} s; Ctrl-C or SIGTERM stops", flush=True)
    try:
        while not stop:
            for tag in (p for p in tag_dirs(ckpt_dir) if (p / META).is_file()):
                cfg = make_config(str(tag))
                if (eval_dir(cfg, {"run_dir": ckpt_dir.parent, "tag": tag.name}) / "report.json").exists():
                    continue
                try:
                    reports.append(evaluate(cfg))
                except CheckpointError as e:
                    print(f"mebt eval: skipped {tag.name}: {e}")
                if stop or (max_evals and len(reports) >= max_evals):
                    return reports
            deadline = time.monotonic() + poll_s
            while not stop and time.monotonic() < deadline:
                time.sleep(min(1.0, poll_s))
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    return reports
