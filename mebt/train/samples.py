"""Videos sampled during training: codes from the model, decoded by the tokenizer into an MP4/GIF grid.

Every rank runs the sampler (under ZeRO-3 each forward needs all ranks to gather the parameters; the
number of forward passes is fixed by the sampling config, so the ranks stay in step); rank 0 decodes,
writes ``RUN_DIR/samples/step_N.{npy,mp4,gif}`` and logs them to MLflow. Without a tokenizer only the
code grids are written.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mebt.core.sampling import sample
from mebt.errors import UserError
from mebt.fsutil import atomic_write
from mebt.media import write_video_grid


class SampleWriter:
    def __init__(self, cfg, device: torch.device, active: bool):
        self.cfg, self.device, self.active = cfg, device, active
        self.dir = Path(cfg.train.run_dir) / "samples"
        self.tokenizer = None
        if cfg.train.tokenizer and active:
            from mebt.tokenizer.checkpoint import load_tokenizer

            self.tokenizer = load_tokenizer(cfg.train.tokenizer, map_location=device)   # decode where we train
            if self.tokenizer.cfg.n_codes != cfg.model.vocab_size:
                raise UserError(f"tokenizer '{cfg.train.tokenizer}' has {self.tokenizer.cfg.n_codes} codes but "
                                f"model.vocab_size is {cfg.model.vocab_size}; use the tokenizer the shards were "
                                "made with")

    @torch.no_grad()
    def write(self, model, step: int, tracker) -> list[Path]:
        cfg = self.cfg
        generator = torch.Generator(device=self.device).manual_seed(cfg.train.seed + step)
        was_training = model.training
        model.eval()
        # Rank 0 shows a bar per phase (the ones after the last step take minutes on a CPU); mid-training
        # bars vanish when done, so the training bar stays the last line.
        final = step >= cfg.train.steps
        codes = sample(model, cfg.sampling, cfg.train.num_samples, generator=generator, progress=self.active,
                       desc=f"samples at step {step}", leave=final)
        model.train(was_training)
        if not self.active:
            return []
        self.dir.mkdir(parents=True, exist_ok=True)
        grids = codes.view(-1, *cfg.model.latent_shape).cpu()
        stem = self.dir / f"step_{step:08d}"
        with atomic_write(stem.with_suffix(".npy")) as tmp:
            np.save(tmp, grids.numpy().astype(np.int16), allow_pickle=False)
        paths = [stem.with_suffix(".npy")]
        if self.tokenizer is not None:
            video = torch.cat([self.tokenizer.decode(clip.to(self.device)).float().cpu()
                               for clip in tqdm(grids.split(1), desc="decoding samples", unit="clip", leave=final)])
            paths += write_video_grid(video, stem)
        for path in paths:
            tracker.log_artifact(path, artifact_path="samples")
        return paths
