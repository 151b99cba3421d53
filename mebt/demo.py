"""`mebt demo`: from nothing to generated videos on one machine, every stage real, under one output dir.

Stages (each resumable; a finished one is recorded in ``OUT/demo.json`` and skipped by the next run):

1. ``videos``     procedural bouncing-shape videos (mp4 + splits), ``mebt data synth``
2. ``tokenizer``  a small 3D VQGAN trained on them, ``mebt tokenizer train``
3. ``shards``     clips -> codes -> tar shards + manifest, verified, ``mebt preprocess`` + ``mebt data verify``
4. ``train``      MeBT with DeepSpeed ZeRO-2 on 2 processes (1 on a 1-core machine), MLflow in
                  ``OUT/mebt/mlflow.db``, ``mebt launch local train``
5. ``export``     one fp32 model file, ``mebt export``
6. ``samples``    unconditional samples and samples conditioned on the first latent frame of held-out
                  clips, decoded; ``OUT/demo_grid.mp4|gif``: real clips / conditional / unconditional rows
7. ``eval``       held-out masked-token loss/accuracy, code statistics of samples, and FVD/KVD of the samples
                  with the standard I3D (or ``--i3d FILE``) next to two reference points: training clips (the
                  floor) and tokenizer reconstructions (the ceiling the tokenizer allows); into MLflow

The defaults are sized for a 2-core CPU; ``quick`` shrinks every budget for tests.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mebt.config import load_config, refuse_changed_settings, to_dict
from mebt.errors import Interrupted, UserError
from mebt.fsutil import write_json, write_text
from mebt.logs import ensure_logging

# The packaged configs of the demo's tokenizer and MeBT (configs/demo_tokenizer.yaml, configs/demo.yaml);
# the demo adds what depends on its own settings.
TOKENIZER_CONFIG, MEBT_CONFIG = "demo_tokenizer", "demo"
STAGES = ("videos", "tokenizer", "shards", "train", "export", "samples", "eval")

log = logging.getLogger(__name__)


def demo_sampling():
    """The sampling settings of the demo's MeBT config: its grid and its evaluation sample alike."""
    from mebt.config import from_dict, read_config_file
    from mebt.core.sampling import SamplingConfig

    return from_dict(SamplingConfig, read_config_file(MEBT_CONFIG)["sampling"], prefix="sampling.")


@dataclass
class DemoConfig:
    out_dir: str = field(default="runs/demo", metadata={"flag": "out"})   # output directory
    num_videos: int = 192
    frames: int = 16                # per synthetic video
    clip_frames: int = 8            # per training clip; the tokenizer maps them to 4 latent frames
    codebook: int = 128             # tokenizer codes
    resolution: int = 32
    palette: int = 6                # SynthConfig.palette: few colors, so a tokenizer trained in minutes is crisp
    # Sized so that all stages, FVD included, take about as long as before the demo scored FVD.
    tokenizer_steps: int = 1050
    mebt_steps: int = 1600
    nproc: int = 0                  # 0: 2 processes when 2 cores exist, else 1
    num_samples: int = 8
    i3d: str | None = None
    seed: int = 0
    quick: bool = False

    def __post_init__(self):
        if self.quick:
            self.num_videos, self.frames, self.tokenizer_steps, self.mebt_steps = 8, 12, 20, 12
        self.nproc = self.nproc or min(2, os.cpu_count() or 1)
        if self.clip_frames % 4 or not 4 <= self.clip_frames <= self.frames:
            raise UserError(f"demo clip_frames must be a multiple of 4 within the {self.frames} video frames, "
                            f"got {self.clip_frames}")


class Demo:
    def __init__(self, cfg: DemoConfig):
        self.cfg, self.out = cfg, Path(cfg.out_dir)
        self.record_path = self.out / "demo.json"
        self.record = json.loads(self.record_path.read_text()) if self.record_path.exists() else {}
        # The I3D weights only matter to the eval stage: giving them later re-runs just that stage.
        settings = {k: v for k, v in asdict(cfg).items() if k != "i3d"}
        refuse_changed_settings(f"'{self.out}' holds a demo made with other settings",
                                self.record.get("config", settings), settings,
                                "use another --out or the same settings", UserError)
        evaluation = self.record.get("stages", {}).get("eval")
        if evaluation and (evaluation.get("i3d") != cfg.i3d or "i3d_network" not in evaluation):
            del self.record["stages"]["eval"]   # other I3D weights, or made before the demo scored FVD
        self.record["config"] = asdict(cfg)

    def stage(self, name: str, run) -> dict:
        """Run a stage unless an earlier run finished it; record its result and wall time."""
        done = self.record.setdefault("stages", {})
        if name in done:
            log.info(f"[{name}] done before ({done[name]['seconds']:.0f} s), reusing it")
            return done[name]
        log.info(f"[{name}] ...")
        start = time.perf_counter()
        result = run()
        done[name] = {**result, "seconds": round(time.perf_counter() - start, 1)}
        write_json(self.record_path, self.record)
        return done[name]

    # --- stages ----------------------------------------------------------------------------------------

    def videos(self) -> dict:
        from data_pipeline.synthetic_videos import SynthConfig, write_synthetic_dataset

        c = self.cfg
        result = write_synthetic_dataset(self.out / "videos", SynthConfig(
            num_videos=c.num_videos, frames=c.frames, resolution=c.resolution, palette=c.palette,
            test_fraction=0.25, seed=c.seed))
        return {"train": result["train"], "test": result["test"]}

    def tokenizer(self) -> dict:
        from mebt.train.tokenizer import TokenizerRunConfig, train_tokenizer_on_videos

        c = self.cfg
        cfg = load_config(TokenizerRunConfig, TOKENIZER_CONFIG, [   # 4 latent frames of clip_frames frames
            f"model.downsample=[{c.clip_frames // 4}, 4, 4]", f"model.n_codes={c.codebook}",
            f"optim.warmup_steps={min(20, c.tokenizer_steps // 2)}", f"train.steps={c.tokenizer_steps}",
            f"train.batch_size={64 // c.clip_frames}", f"train.seed={c.seed}",
            f"train.ckpt_every={max(1, c.tokenizer_steps // 4)}", f"train.run_dir={self.out / 'tokenizer'}",
            f"data.root={self.out / 'videos'}", f"data.clip.sequence_length={c.clip_frames}",
            f"data.clip.resolution={c.resolution}"])
        result = train_tokenizer_on_videos(cfg)
        grid = [c.clip_frames // cfg.model.downsample[0], *(c.resolution // d for d in cfg.model.downsample[1:])]
        return {"tokenizer": result["tokenizer"], "psnr": round(result["psnr"], 2), "codes": cfg.model.n_codes,
                "grid": grid}

    def shards(self, tokenizer: str) -> dict:
        from data_pipeline.preprocess import PreprocessConfig, preprocess
        from data_pipeline.verify import verify_dataset
        from data_pipeline.video import ClipConfig

        clip = ClipConfig(sequence_length=self.cfg.clip_frames, resolution=self.cfg.resolution, starts="all",
                          all_stride=2)
        result = preprocess(PreprocessConfig(input_dir=str(self.out / "videos"), out_dir=str(self.out / "codes"),
                                             tokenizer=tokenizer, split="train", clip=clip, videos_per_shard=16,
                                             device="cpu"))
        report = verify_dataset(self.out / "codes")
        if not report.ok:
            raise UserError(f"the demo's shards failed verification: {report.lines()[0]}")
        return {"clips": result["merged"]["clips"], "shards": result["merged"]["shards"],
                "verified": report.samples_checked}

    def train(self, tokenizer: dict) -> dict:
        import yaml

        from launchers.local import launch_local
        from mebt.train.config import RunConfig
        from mebt.train.loop import REQUEUE_EXIT_CODE, train

        c = self.cfg
        cfg = load_config(RunConfig, MEBT_CONFIG, [
            f"model.vocab_size={tokenizer['codes']}", f"model.latent_shape={list(tokenizer['grid'])}",
            f"data.data_dir={self.out / 'codes'}", f"data.batch_size={4 if c.quick else max(1, 32 // c.nproc)}",
            f"train.steps={c.mebt_steps}", f"train.log_every={max(1, min(50, c.mebt_steps // 4))}",
            f"train.ckpt_every={max(1, c.mebt_steps // 3)}", f"train.tokenizer={tokenizer['tokenizer']}",
            f"train.seed={c.seed}", f"train.run_dir={self.out / 'mebt'}",
            # Its own store, not the working directory's: the demo is self-contained (artifacts in mebt/mlruns).
            f"mlflow.tracking_uri=sqlite:///{(self.out / 'mebt' / 'mlflow.db').resolve()}"])
        write_text(self.out / "mebt_config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))   # for the record
        if c.nproc > 1:
            code = launch_local(cfg, c.nproc)
            if code:
                if code in (REQUEUE_EXIT_CODE, 130):   # Ctrl-C: rank 0 has said what was saved and how to resume
                    raise Interrupted("", code)
                raise UserError(f"demo training exited with {code}; run `mebt demo` again to resume it")
        elif train(cfg)["preempted"]:
            raise Interrupted("", REQUEUE_EXIT_CODE)
        records = [json.loads(line) for line in (self.out / "mebt" / "metrics.jsonl").read_text().splitlines()]
        return {"run_dir": str(self.out / "mebt"), "processes": c.nproc, "final_loss": round(records[-1]["loss"], 4),
                "final_acc1": round(records[-1]["acc1"], 4), "clips_per_s": round(records[-1]["samples_per_s"], 1)}

    def export(self) -> dict:
        from mebt.train.checkpoint import export

        return export(self.out / "mebt", self.out / "mebt" / "model.pt")

    def samples(self, model_path: str, tokenizer_path: str) -> dict:
        """Real held-out clips, samples given their first latent frame, and unconditional samples, as grids."""
        from data_pipeline.video import ClipConfig, VideoClipDataset
        from mebt.core.model_file import load_model
        from mebt.core.sampling import sample
        from mebt.media import side_by_side, to_uint8, write_formats
        from mebt.tokenizer.checkpoint import load_tokenizer

        n = self.cfg.num_samples
        model, tokenizer = load_model(model_path).eval(), load_tokenizer(tokenizer_path).eval()
        real = VideoClipDataset(self.out / "videos", "test", ClipConfig(sequence_length=self.cfg.clip_frames,
                                                                         resolution=self.cfg.resolution), seed=1)
        clips = torch.stack([real[i % len(real)]["video"] for i in range(n)])
        shape = model.cfg.latent_shape
        sampling = demo_sampling()
        g = torch.Generator().manual_seed(self.cfg.seed)
        with torch.no_grad():
            codes = tokenizer.encode(clips).flatten(1)
            first = torch.zeros(codes.shape[1], dtype=torch.bool)
            first[:shape[1] * shape[2]] = True   # the first latent frame is given
            conditional = sample(model, sampling, n, given_codes=codes, given_mask=first, generator=g, progress=True)
            unconditional = sample(model, sampling, n, generator=g, progress=True)
            videos = [to_uint8(tokenizer.decode(c.view(n, *shape))) for c in (conditional, unconditional)]
        grid = side_by_side(to_uint8(clips), *videos, pad=0)   # rows: real, conditional, unconditional
        paths = write_formats(grid, self.out / "demo_grid")
        given = f"conditional (first {self.cfg.clip_frames // shape[0]} frames given)"
        return {"grid": [str(p) for p in paths], "rows": ["real", given, "unconditional"], "frames": len(grid),
                "samples": n}

    def eval(self, model_path: str, tokenizer_path: str) -> dict:
        """Held-out metrics and FVD/KVD, each next to reference points; all logged into the training's MLflow
        run at its last step.

        - heldout_loss / heldout_acc1: masked-token prediction with half of every held-out clip masked;
        - code_tv: total variation between the code histograms of unconditional samples and held-out clips,
          next to code_tv_train_clips, the same for training clips;
        - fvd / kvd: unconditional samples vs held-out clips; fvd_train_clips: training clips vs held-out
          clips (the floor: real vs real at this count); fvd_reconstructions: the tokenizer's
          reconstructions of the training clips vs held-out clips (what a perfect MeBT, whose codes
          follow the data's, would score once decoded by this tokenizer; a less diverse model can land
          below it). I3D needs at least 9 frames, so 8-frame clips are shown with every frame twice (the
          same for every set): comparable between demo runs, not with published FVD16.
        """
        from data_pipeline.video import ClipConfig, VideoClipDataset
        from mebt.core.sampling import sample
        from mebt.eval.code_metrics import code_tv, masked_prediction
        from mebt.eval.evaluate import load_for_eval, log_to_mlflow
        from mebt.eval.fvd import fvd, kvd
        from mebt.eval.i3d import i3d_features
        from mebt.eval.i3d_weights import load_i3d
        from mebt.eval.scoring import repeat_frames
        from mebt.media import to_uint8
        from mebt.tokenizer.checkpoint import load_tokenizer

        i3d = load_i3d(self.cfg.i3d)   # the standard network unless a file was given; fails before the work
        model, info = load_for_eval(model_path)   # the exported weights with their step and MLflow run
        tokenizer = load_tokenizer(tokenizer_path).eval()
        clip = ClipConfig(sequence_length=self.cfg.clip_frames, resolution=self.cfg.resolution)
        videos, n = {}, 4 * self.cfg.num_samples
        for split in ("test", "train"):   # as many training clips as held-out ones
            data = VideoClipDataset(self.out / "videos", split, clip, seed=2)
            n = min(n, len(data))
            videos[split] = torch.stack([data[i]["video"] for i in range(n)])
        g = torch.Generator().manual_seed(self.cfg.seed + 1)
        with torch.no_grad():
            codes = {split: tokenizer.encode(v).flatten(1) for split, v in videos.items()}
            loss, acc1 = masked_prediction(model, codes["test"], g)
            generated = sample(model, demo_sampling(), n, generator=g, progress=True)
            shape = model.cfg.latent_shape
            videos["generated"] = tokenizer.decode(generated.view(n, *shape))
            videos["reconstructions"] = tokenizer.decode(codes["train"].view(n, *shape))

        vocab = model.cfg.vocab_size
        metrics = {"heldout_loss": round(loss, 4), "heldout_acc1": round(acc1, 4),
                   "code_tv": round(code_tv(generated, codes["test"], vocab), 4),
                   "code_tv_train_clips": round(code_tv(codes["train"], codes["test"], vocab), 4)}
        repeat = -(-16 // self.cfg.clip_frames)
        features = {name: i3d_features(i3d, repeat_frames(to_uint8(v), repeat), desc=f"I3D features ({name})")
                    for name, v in videos.items()}
        for name, key in (("generated", ""), ("train", "_train_clips"), ("reconstructions", "_reconstructions")):
            metrics[f"fvd{key}"] = round(fvd(features["test"], features[name]), 2)
            metrics[f"kvd{key}"] = round(kvd(features["test"], features[name]), 4)
        result = {"metrics": metrics, "clips": n, "i3d": self.cfg.i3d, "i3d_network": i3d.network,
                  "fvd": f"I3D ({i3d.network['network']}, {i3d.network['numerics']} numerics) on {n} clips per set "
                         f"vs {n} held-out clips, every frame shown {repeat}x ({self.cfg.clip_frames} -> "
                         f"{self.cfg.clip_frames * repeat} frames), float64 protocol"}
        result["mlflow"] = log_to_mlflow(info, {"metrics": metrics}, [])[1]
        return result

    def run(self) -> dict:
        from mebt.train.tracking import recorded_tracking_uri

        ensure_logging()   # the stage messages are log records
        self.out.mkdir(parents=True, exist_ok=True)
        self.stage("videos", self.videos)
        tok = self.stage("tokenizer", self.tokenizer)
        self.stage("shards", lambda: self.shards(tok["tokenizer"]))
        trained = self.stage("train", lambda: self.train(tok))
        model = self.stage("export", self.export)["out"]
        self.stage("samples", lambda: self.samples(model, tok["tokenizer"]))
        self.stage("eval", lambda: self.eval(model, tok["tokenizer"]))
        stages = self.record["stages"]
        print("\nmebt demo finished:")
        for name in STAGES:
            print(f"  {name:10s} {stages[name]['seconds']:7.1f} s")
        print(f"  tokenizer PSNR {tok['psnr']} dB; MeBT final loss {trained['final_loss']}, "
              f"acc {trained['final_acc1']}")
        m = stages["eval"]["metrics"]
        print(f"  held-out loss {m['heldout_loss']}, acc {m['heldout_acc1']}; code histogram distance {m['code_tv']} "
              f"(training clips: {m['code_tv_train_clips']})")
        print(f"  FVD {m['fvd']:.1f} (KVD {m['kvd']:.3f}) of samples vs held-out clips; reference points: "
              f"training clips {m['fvd_train_clips']:.1f} (the floor: real vs real at this count), tokenizer "
              f"reconstructions {m['fvd_reconstructions']:.1f} (what a perfect MeBT would score through this "
              "tokenizer)")
        print(f"  ({stages['eval']['fvd']})")
        print(f"  grid (real / conditional / unconditional): {stages['samples']['grid'][0]}")
        print(f"  MLflow UI: mlflow ui --backend-store-uri {recorded_tracking_uri(trained['run_dir'])}")
        return self.record
