"""Offline evaluation: sample videos from a checkpoint, decode them, score them with FVD/KVD (`mebt eval`).

``evaluate(cfg)`` reads top to bottom: model + tokenizer -> sample and decode this process's batches
(each batch is a file; batches already on disk are kept, so an interrupted evaluation resumes) -> I3D
features of those batches (``mebt.eval.scoring``) -> once every batch exists: real-video features (cached on
disk) -> FVD/KVD by the chosen protocol (``mebt.eval.protocols``: network numerics, pixel rounding,
arithmetic, counts and runs) -> ``report.json`` + an MP4/GIF grid of samples -> the metrics logged into
the training run's MLflow run at the checkpoint's step. Batches are seeded by their index, so several
processes (``shard_index``/``num_shards``) each sample a slice and the result does not depend on how
the work was split or resumed. FVD uses the standard I3D (``mebt.eval.i3d_weights``) unless ``i3d`` names a
weights file, and needs real videos (``real_dir``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

from mebt.config import from_dict
from mebt.core.model_file import load_model_with_extras
from mebt.core.sampling import SamplingConfig, sample
from mebt.errors import ConfigError, UserError, first_line
from mebt.eval.i3d_weights import cache_root
from mebt.eval.protocols import get_protocol, resolve_counts
from mebt.fsutil import atomic_write, write_json
from mebt.media import tile, to_uint8, write_formats
from mebt.train.distributed import pick_device
from mebt.train.tracking import recorded_run_id

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    checkpoint: str = ""                   # model file, run dir, checkpoints dir or checkpoints/global_stepN
    sampling: SamplingConfig | None = None   # default: the run's sampling section (else the defaults)
    out_dir: str | None = field(default=None, metadata={"flag": "out"})   # default: RUN_DIR/eval/global_stepN, or MODEL.eval/
    tokenizer: str | None = None           # default: the run config's train.tokenizer
    protocol: Literal["float64", "tats", "mebt_16f", "mebt_128f"] = "float64"   # FVD protocol (mebt.eval.protocols)
    num_samples: int | None = None         # generated videos per run (default 256, or the protocol's)
    runs: int | None = None                # generated sets, each scored (default 1, or the protocol's)
    batch_size: int = 16
    frames: int | None = None              # score the first F decoded frames (default: all)
    repeat_frames: int = 1                 # show I3D every frame R times (both sides): R=2 scores 8-frame samples
    i3d: str | None = None                 # I3D weights file; default: the standard TF-Hub network
    real_dir: str | None = None            # videos (split files) for the real statistics; without: no FVD
    real_split: str = "test"
    num_real: int | None = None            # real clips (default 256, or the protocol's)
    real_frame_stride: int | None = None   # default: the training data's clip frame stride, else 1
    seed: int = 0
    shard_index: int = 0
    num_shards: int = 1
    cache_dir: str = str(cache_root() / "real_features")
    grid_samples: int = 8
    device: str = "auto"
    log_mlflow: bool = field(default=True, metadata={"flag": "mlflow"})   # log eval/* into the training's MLflow run
    fvd: bool = True                       # FVD/KVD with I3D (with --real-dir); --no-fvd: the code metrics only

    def __post_init__(self):
        for key in ("batch_size", "num_shards", "grid_samples", "repeat_frames"):
            if getattr(self, key) < 1:
                raise ConfigError(f"'{key}' must be >= 1, got {getattr(self, key)}")
        if not 0 <= self.shard_index < self.num_shards:
            raise ConfigError(f"shard index {self.shard_index} is outside 0..{self.num_shards - 1}")
        counts = resolve_counts(get_protocol(self.protocol), num_samples=self.num_samples, runs=self.runs,
                                num_real=self.num_real)
        self.num_samples, self.runs, self.num_real = counts["num_samples"], counts["runs"], counts["num_real"]
        if self.real_frame_stride is not None and self.real_frame_stride < 1:
            raise ConfigError(f"'real_frame_stride' must be >= 1, got {self.real_frame_stride}")

    @property
    def total_samples(self) -> int:
        return self.num_samples * self.runs


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
                       "mlflow_run_id": extras.get("mlflow_run_id"), "tag": extras.get("tag", path.stem),
                       "mlflow_tracking_uri": extras.get("mlflow_tracking_uri")}
    from mebt.train.checkpoint import consolidated_model

    model, meta, tag_dir = consolidated_model(path)
    run_dir = tag_dir.parent.parent
    return model, {"step": meta["step"], "config": meta["config"], "run_dir": run_dir,
                   "mlflow_run_id": meta.get("mlflow_run_id") or recorded_run_id(run_dir), "tag": tag_dir.name}


def eval_dir(cfg: EvalConfig, info: dict) -> Path:
    """Where an evaluation writes: ``out_dir``, else MODEL_FILE.eval/, else RUN_DIR/eval/global_stepN/."""
    if cfg.out_dir:
        return Path(cfg.out_dir)
    if Path(cfg.checkpoint).is_file():
        return Path(str(cfg.checkpoint) + ".eval")
    return Path(info["run_dir"]) / "eval" / info["tag"]


def _num_batches(cfg: EvalConfig) -> int:
    return -(-cfg.total_samples // cfg.batch_size)


def _batches(cfg: EvalConfig) -> list[int]:
    return [j for j in range(_num_batches(cfg)) if j % cfg.num_shards == cfg.shard_index]


def _batch_file(out: Path, j: int) -> Path:
    return out / f"batch_{j:05d}.npz"


def sample_batches(model, tokenizer, cfg: EvalConfig, sampling: SamplingConfig, out: Path, device) -> None:
    """This process's batches as ``samples/batch_J.npz`` (codes + uint8 video), skipping finished ones.

    Videos are stored with the protocol's pixel rule; a batch stored under another rule is decoded again
    from its codes (sampling is the expensive part, decoding is not).
    """
    out.mkdir(parents=True, exist_ok=True)
    pixels = get_protocol(cfg.protocol).pixels
    shape = model.cfg.latent_shape
    todo = []
    for j in _batches(cfg):
        path = _batch_file(out, j)
        if path.exists():
            with np.load(path, allow_pickle=False) as batch:
                if str(batch["pixels"]) == pixels:
                    continue
                todo.append((j, torch.from_numpy(batch["codes"].astype(np.int64)).to(device)))
        else:
            todo.append((j, None))
    for j, codes in tqdm(todo, desc="sampling + decoding", unit="batch"):
        n = min(cfg.batch_size, cfg.total_samples - j * cfg.batch_size)
        generator = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + j)
        with torch.no_grad():
            if codes is None:
                codes = sample(model, sampling, n, generator=generator).view(n, *shape)
            video = to_uint8(tokenizer.decode(codes).float().cpu(), pixels=pixels)
        with atomic_write(_batch_file(out, j)) as tmp:
            np.savez(tmp, codes=codes.cpu().numpy().astype(np.int16), video=video, pixels=np.array(pixels))


def samples_complete(cfg: EvalConfig, out: Path) -> bool:
    """Whether every batch exists (other shards' too)."""
    return all(_batch_file(out, j).exists() for j in range(_num_batches(cfg)))


def first_videos(cfg: EvalConfig, out: Path, n: int) -> np.ndarray:
    """uint8 [n, T, H, W, 3]: the first n samples, reading only the batches that hold them."""
    batches = [np.load(_batch_file(out, j), allow_pickle=False)["video"] for j in range(-(-n // cfg.batch_size))]
    return np.concatenate(batches)[:n]


def real_frame_stride(cfg: EvalConfig, info: dict) -> int:
    """The frame stride of real clips: given, else the one the training clips were cut with, else 1."""
    if cfg.real_frame_stride:
        return cfg.real_frame_stride
    data = (info.get("config") or {}).get("data") or {}
    try:
        from data_pipeline.sources import read_dataset_info

        return int(read_dataset_info(data["data_dir"], data.get("meta_dir"))["clip"]["frame_stride"]) \
            if data.get("data_dir") else 1
    except Exception:   # a dataset moved or deleted since training: the plain default
        return 1


def real_clips(cfg: EvalConfig, frames: int, resolution: int, stride: int) -> np.ndarray:
    """``num_real`` uint8 [T, H, W, 3] clips of real videos (random starts, seeded), decoded from the files."""
    from data_pipeline.video import ClipConfig, VideoClipDataset

    dataset = VideoClipDataset(cfg.real_dir, cfg.real_split,
                               ClipConfig(sequence_length=frames, resolution=resolution, frame_stride=stride),
                               seed=cfg.seed)
    clips = []
    epoch = 0
    with tqdm(total=cfg.num_real, desc=f"real clips ({frames} frames)", unit="clip") as bar:
        while len(clips) < cfg.num_real:   # one random clip per video per epoch, new starts each epoch
            dataset.set_epoch(epoch)
            for i in range(min(len(dataset), cfg.num_real - len(clips))):
                clips.append(to_uint8(dataset[i]["video"][None])[0])
                bar.update(1)
            epoch += 1
    return np.stack(clips)


def check_frames(cfg: EvalConfig, frames_made: int) -> None:
    """The frames FVD scores: at most what the model makes, and enough for I3D once repeated."""
    from mebt.eval.i3d import MIN_FRAMES

    if cfg.frames and cfg.frames > frames_made:
        raise UserError(f"--frames {cfg.frames} exceeds the {frames_made} frames the model generates")
    frames = cfg.frames or frames_made
    if frames * cfg.repeat_frames < MIN_FRAMES:
        raise UserError(f"FVD of {frames}-frame samples: I3D needs at least {MIN_FRAMES} frames; pass --repeat-frames "
                        f"{-(-MIN_FRAMES // frames)} (every frame shown that often, real clips too, as mebt demo "
                        f"scores its 8-frame clips: comparable only with numbers scored the same way) or --no-fvd")


def score(cfg: EvalConfig, samples: Path, i3d, device, info: dict) -> dict:
    """FVD/KVD of every batch's features (``mebt.eval.scoring``) against real clips of the same length."""
    from mebt.eval.scoring import generated_features, real_features
    from mebt.eval.scoring import score as score_features

    files = [_batch_file(samples, j) for j in range(_num_batches(cfg))]
    with np.load(files[0], allow_pickle=False) as first:
        frames_made, resolution = first["video"].shape[1], first["video"].shape[2]
    check_frames(cfg, frames_made)
    frames, stride = cfg.frames or frames_made, real_frame_stride(cfg, info)
    generated = generated_features(files, frames, i3d, device, cfg.repeat_frames)
    base = {"real_dir": str(Path(cfg.real_dir).resolve()), "split": cfg.real_split, "resolution": resolution,
            "num_real": cfg.num_real, "seed": cfg.seed, "frame_stride": stride}
    decoded = {}   # each clip length decoded once, and only on a cache miss

    def real(length: int, windows: bool) -> np.ndarray:
        def clips():
            if length not in decoded:
                decoded[length] = real_clips(cfg, length, resolution, stride)
            return decoded[length]
        return real_features({**base, "frames": length}, Path(cfg.cache_dir), clips, i3d, device, windows,
                             cfg.repeat_frames)

    return score_features(generated, real, cfg.protocol, cfg.runs, i3d, frames=frames, resolution=resolution,
                          **({"repeat_frames": cfg.repeat_frames} if cfg.repeat_frames > 1 else {}),
                          real=cfg.num_real, real_dir=cfg.real_dir, real_split=cfg.real_split,
                          real_frame_stride=stride)


def write_grid(cfg: EvalConfig, out: Path) -> list[Path]:
    return write_formats(tile(first_videos(cfg, out / "samples", min(cfg.grid_samples, cfg.total_samples))),
                         out / "samples_grid")


def log_to_mlflow(info: dict, report: dict, grid: list[Path]) -> tuple[bool, str]:
    """Metrics into the training run at the checkpoint's step, the grid and the report (protocol, counts,
    network, per-run values) as artifacts under ``eval/TAG``; never fails the evaluation, and gives up on an
    unreachable server within seconds (``HTTP_POLICY``). Returns (logged, what happened in one line)."""
    run_id, config = info.get("mlflow_run_id"), info.get("config") or {}
    if not run_id:
        return False, "not logged: no MLflow run recorded in the checkpoint"
    from mlflow.entities import Metric

    from mebt.train.tracking import mlflow_client, tracking_uri

    uri = info.get("mlflow_tracking_uri") or tracking_uri((config.get("mlflow") or {}).get("tracking_uri"),
                                                          info["run_dir"])
    try:
        client = mlflow_client(uri)
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(f"eval/{k}", float(v), now, info["step"])
                                          for k, v in report["metrics"].items()])
        for path in grid:
            client.log_artifact(run_id, str(path), artifact_path=f"eval/{info['tag']}")
        client.log_dict(run_id, {k: v for k, v in report.items() if k != "mlflow"}, f"eval/{info['tag']}/report.json")
    except Exception as e:   # tracking must not lose an evaluation that took hours
        return False, f"not logged: MLflow logging failed ({type(e).__name__}: {first_line(e)[:200]})"
    return True, f"logged to run {run_id} at {uri}"


def run_sampling(checkpoint: str | Path) -> dict | None:
    """The ``sampling`` section of the training run a checkpoint or model file comes from (None if unknown)."""
    try:
        path = Path(checkpoint)
        if path.is_file():
            from mebt.core.model_file import read_model_file

            extras = read_model_file(path)
            config = json.loads(extras["run_config"]) if "run_config" in extras else {}
        else:
            from mebt.train.checkpoint import META, resolve_checkpoint

            ckpt_dir, tag = resolve_checkpoint(path)
            config = json.loads((ckpt_dir / tag / META).read_text())["config"]
    except Exception:   # not readable here: the evaluation itself reports what is wrong
        return None
    return config.get("sampling")


def run_sampling_of(cfg: EvalConfig, info: dict) -> tuple[SamplingConfig, str]:
    """The sampling settings to use and where they come from: given, the run's config, or the defaults."""
    if cfg.sampling is not None:
        return cfg.sampling, "given"
    section = (info.get("config") or {}).get("sampling")
    if section:
        return from_dict(SamplingConfig, section, prefix="sampling."), "the run's config"
    return SamplingConfig(), "defaults (the checkpoint records no run config)"


def training_codes(info: dict, count: int, seed: int, grid) -> torch.Tensor | None:
    """``count`` random code grids of the run's training data (None when the data cannot be read here)."""
    data = ((info.get("config") or {}).get("data") or {})
    if not data.get("data_dir"):
        return None
    try:
        from dataclasses import replace

        from data_pipeline.loader import LoaderConfig, make_loader

        # The run's data section as it was (a URL spec keeps its meta_dir, timeouts, cache), read here in order.
        base = replace(from_dict(LoaderConfig, data, prefix="data."), batch_size=1, shuffle=True, seed=seed,
                       drop_last=False, num_workers=0, crop_frames=None)
        loader = make_loader(base, expect_grid=tuple(grid))
        loader = make_loader(replace(base, batch_size=min(count, loader.plan.num_samples)), expect_grid=tuple(grid))
        return next(iter(loader))["codes"]
    except Exception as e:   # moved, deleted or another grid: the metric is left out, and the report says why
        log.warning(f"training clips for code_tv not read from '{data['data_dir']}': {first_line(e)}")
        return None


def code_metrics(cfg: EvalConfig, model, tokenizer, tokenizer_path: str, samples: Path, info: dict,
                 device) -> tuple[dict, list[str]]:
    """The I3D-free metrics (``mebt.eval.code_metrics``) and notes on the ones that could not be computed."""
    from mebt.eval.code_metrics import code_tv, masked_prediction
    from mebt.eval.scoring import cached_array
    from mebt.tokenizer.checkpoint import tokenizer_sha256

    vocab, shape = model.cfg.vocab_size, model.cfg.latent_shape
    generated = torch.from_numpy(np.concatenate([np.load(_batch_file(samples, j), allow_pickle=False)["codes"]
                                                 for j in range(_num_batches(cfg))]).astype(np.int64))
    metrics, notes = {}, []
    heldout = None
    if cfg.real_dir:
        frames = shape[0] * tokenizer.cfg.downsample[0]
        resolution = shape[1] * tokenizer.cfg.downsample[1]
        stride = real_frame_stride(cfg, info)
        key = {"real_dir": str(Path(cfg.real_dir).resolve()), "split": cfg.real_split, "frames": frames,
               "resolution": resolution, "num_real": cfg.num_real, "seed": cfg.seed, "frame_stride": stride,
               "codes_of": tokenizer_sha256(tokenizer_path)}

        def encode():
            clips = torch.from_numpy(real_clips(cfg, frames, resolution, stride)).permute(0, 4, 1, 2, 3)
            with torch.no_grad():
                return torch.cat([tokenizer.encode((part.float() / 255 - 0.5).to(device)).cpu()
                                  for part in clips.split(cfg.batch_size)]).numpy().astype(np.int16)

        heldout = torch.from_numpy(cached_array(key, Path(cfg.cache_dir), encode, "held-out codes").astype(np.int64))
        loss, acc1 = masked_prediction(model, heldout, torch.Generator().manual_seed(cfg.seed))
        metrics.update(heldout_loss=loss, heldout_acc1=acc1, code_tv=code_tv(generated, heldout, vocab))
    else:
        notes.append("heldout_loss, heldout_acc1, code_tv need held-out clips: pass --real-dir")
    train = training_codes(info, len(heldout) if heldout is not None else len(generated), cfg.seed, shape)
    if train is None:
        notes.append("code_tv_vs_train and code_tv_train_clips need the run's training data (data.data_dir)")
    else:
        metrics["code_tv_vs_train"] = code_tv(generated, train, vocab)
        if heldout is not None:
            metrics["code_tv_train_clips"] = code_tv(train, heldout, vocab)   # the floor at this count
    return metrics, notes


def evaluate(cfg: EvalConfig) -> dict:
    device = pick_device(cfg.device)
    model, info = load_for_eval(cfg.checkpoint)
    model = model.to(device).eval()
    run_config = info["config"] or {}
    tokenizer_path = cfg.tokenizer or (run_config.get("train") or {}).get("tokenizer")
    if not tokenizer_path and run_config.get("data"):   # a run from before the dataset's tokenizer was its default
        from mebt.train.config import defaults_from_dataset

        tokenizer_path = defaults_from_dataset({"data": run_config["data"]}).get("train", {}).get("tokenizer")
    if not tokenizer_path:
        raise UserError("mebt eval needs the tokenizer that made the shards to decode samples: pass --tokenizer")
    from mebt.tokenizer.checkpoint import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path).to(device).eval()
    if tokenizer.cfg.n_codes != model.cfg.vocab_size:
        raise UserError(f"tokenizer '{tokenizer_path}' has {tokenizer.cfg.n_codes} codes, the model "
                        f"{model.cfg.vocab_size}; use the tokenizer the shards were made with")
    if cfg.i3d and not cfg.real_dir:
        raise UserError("FVD needs real videos: pass --real-dir (a video folder with split files) with --i3d")
    sampling, source = run_sampling_of(cfg, info)
    i3d = None
    if cfg.real_dir and cfg.fvd:   # the network loads (or fails) before any sampling
        from mebt.eval.i3d_weights import load_i3d

        i3d = load_i3d(cfg.i3d, numerics=get_protocol(cfg.protocol).i3d_numerics).to(device)
        check_frames(cfg, model.cfg.latent_shape[0] * tokenizer.cfg.downsample[0])   # before any sampling
    out = eval_dir(cfg, info)
    log.info(f"evaluating {cfg.checkpoint} (step {info['step']}): {cfg.total_samples} samples in "
             f"{_num_batches(cfg)} batches ({len(_batches(cfg))} in this shard) -> {out}")
    start = time.perf_counter()
    sample_batches(model, tokenizer, cfg, sampling, out / "samples", device)
    if i3d is not None:   # this process's share of the I3D work, next to its batches
        from mebt.eval.scoring import generated_features

        generated_features([_batch_file(out / "samples", j) for j in _batches(cfg)], cfg.frames, i3d, device,
                           cfg.repeat_frames)
    seconds_sampling = time.perf_counter() - start
    if not samples_complete(cfg, out / "samples"):
        return {"complete": False, "out_dir": str(out), "message": "other shards' batches are missing; run again "
                                                                   "without --shard-index once they finish"}
    report = {"checkpoint": str(cfg.checkpoint), "step": info["step"], "num_samples": cfg.total_samples,
              "sampling": asdict(sampling), "sampling_from": source, "seconds_sampling": round(seconds_sampling, 2),
              "metrics": {}, "protocol": None}
    start = time.perf_counter()
    if i3d is not None:
        report.update(score(cfg, out / "samples", i3d, device, info))
    else:
        report["note"] = ("FVD/KVD skipped: " + ("--no-fvd" if cfg.real_dir else "no real videos given (--real-dir)"))
    codes, notes = code_metrics(cfg, model, tokenizer, tokenizer_path, out / "samples", info, device)
    report["metrics"].update(codes)
    report["code_metrics"] = notes
    report["seconds_metrics"] = round(time.perf_counter() - start, 2)
    grid = write_grid(cfg, out)
    report["mlflow"] = "not logged: --no-mlflow" if not cfg.log_mlflow else "not logged: no metrics"
    if cfg.log_mlflow and report["metrics"]:
        logged, report["mlflow"] = log_to_mlflow(info, report, grid)
        if not logged:
            log.warning(f"metrics {report['mlflow']}")
    report.update(complete=True, out_dir=str(out), grid=[str(p) for p in grid])
    write_json(out / "report.json", report)
    return report


@dataclass
class EvalJob:
    """`mebt eval` as one picklable callable (what a SLURM job runs): evaluate ``config`` once, or with
    ``watch`` evaluate every checkpoint of that run as it appears (each in ``config.out_dir/TAG`` when an
    output dir is set, else in its own ``eval_dir``)."""
    config: EvalConfig = field(default_factory=EvalConfig, metadata={"flags": True})
    watch: str | None = None               # a run dir: evaluate each new checkpoint once, until stopped
    poll_s: float = 30.0                   # --watch: seconds between looks
    max_evals: int | None = None           # --watch: stop after this many evaluations
    preset: str | None = None              # published sampling settings (sky_16f, ucf_128f, ...) under the overrides

    def config_for(self, checkpoint: str) -> EvalConfig:
        out = self.config.out_dir
        if self.watch and out:
            out = str(Path(out) / Path(checkpoint).name)
        return dataclasses.replace(self.config, checkpoint=str(checkpoint), out_dir=out)

    def record_dir(self) -> Path:
        """Where a submitted job records itself: the output dir, else next to what it evaluates."""
        if self.config.out_dir:
            return Path(self.config.out_dir).resolve()
        target = Path(self.watch or self.config.checkpoint)
        return target.resolve() / "eval" if target.is_dir() else Path(str(target) + ".eval").resolve()

    def __call__(self) -> dict | list[dict]:
        if self.watch:
            return watch(self.watch, self.config_for, poll_s=self.poll_s, max_evals=self.max_evals)
        if not self.config.checkpoint:
            raise UserError("mebt eval needs --checkpoint CKPT|RUN_DIR or --watch RUN_DIR")
        return evaluate(self.config)


def watch(run_dir: str | Path, make_config, poll_s: float = 30.0, max_evals: int | None = None) -> list[dict]:
    """Evaluate every checkpoint of a run once, as it appears, until stopped (Ctrl-C/SIGTERM) or
    ``max_evals``. The ``report.json`` in a checkpoint's ``eval_dir`` marks it as done, so a restarted
    watcher skips it; a checkpoint pruned by training before its turn is skipped with a message."""
    import signal

    from mebt.core.model_file import CheckpointError
    from mebt.train.checkpoint import CKPT_DIR, META, tag_dirs

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
                    log.warning(f"skipped {tag.name}: {e}")
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
