"""Fixtures of the integration tests: a tiny training run that the evaluator and SLURM tests evaluate."""
import json
import os
import subprocess
import sys

import pytest
import torch

from data_pipeline.synthetic_code_shards import CodeDatasetConfig, write_code_dataset
from data_pipeline.synthetic_codes import SyntheticCodesConfig
from data_pipeline.synthetic_videos import SynthConfig, write_synthetic_dataset
from mebt.tokenizer.checkpoint import save_tokenizer
from mebt.tokenizer.vqgan import VQGAN, VQGANConfig
from tests.helpers import ROOT
from tests.helpers.i3d_weights import fake_i3d

GRID = (4, 4, 4)   # with a 4x4x4 tokenizer: 16 frames at 16x16, the fewest frames FVD16 takes


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    codes = root / "codes"
    write_code_dataset(codes, CodeDatasetConfig(codes=SyntheticCodesConfig(num_samples=64, sizes=(1, 2)), grid=GRID,
                                                vocab_size=8, shard_size=32), progress=False)
    torch.manual_seed(0)
    tokenizer = root / "vqgan.ckpt"
    save_tokenizer(VQGAN(VQGANConfig(embedding_dim=8, n_codes=8, n_hiddens=4, downsample=(4, 4, 4), num_groups=4)),
                   tokenizer)
    videos = root / "videos"
    write_synthetic_dataset(videos, SynthConfig(num_videos=6, frames=20, resolution=24, test_fraction=0.5),
                            progress=False)
    run_dir = root / "run"
    args = [f"data.data_dir={codes}", "data.batch_size=4", f"train.run_dir={run_dir}", "train.steps=4",
            "train.ckpt_every=2", "train.log_every=2", f"model.latent_shape=[{','.join(map(str, GRID))}]",
            "model.vocab_size=8", "model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.n_latent=8",
            "sampling.steps=2", "train.num_samples=1", f"train.tokenizer={tokenizer}"]
    # Started from its own folder, whose MLflow store (root/mlflow.db) it logs to by default.
    done = subprocess.run([sys.executable, "-m", "mebt.cli", "train", *args], capture_output=True, text=True,
                          timeout=300, cwd=root, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    return {"run_dir": run_dir, "tokenizer": tokenizer, "videos": videos, "i3d": fake_i3d(root / "i3d.pt"),
            "cache": root / "cache", "run_id": json.loads(done.stdout.strip().splitlines()[-1])["mlflow_run_id"],
            "store": f"sqlite:///{root / 'mlflow.db'}", "root": root}
