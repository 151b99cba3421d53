"""The shipped configs: the six paper configs match the published settings, and every config validates."""
import dataclasses
from pathlib import Path

import pytest
import torch

from mebt.config import load_config
from mebt.core.model import MeBT
from mebt.core.sampling import PRESETS
from mebt.train.config import RunConfig, deepspeed_config

# (lr, weight decay, batch per GPU, length prior) from the paper's configs (reference section 2).
PAPER = {
    "sky_16f": (1.08e-5, 0.01, 6, "longest"), "sky_128f": (1.8e-5, 0.01, 5, "gaussian2"),
    "taichi_16f": (3e-5, 1e-4, 32, "longest"), "taichi_128f": (3e-5, 1e-4, 4, "gaussian100000_2"),
    "ucf_16f": (3e-5, 1e-4, 32, "longest"), "ucf_128f": (3e-5, 1e-4, 6, "gaussian100000_2"),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_configs_hold_the_published_settings(name):
    cfg = load_config(RunConfig, f"configs/{name}.yaml")
    lr, wd, batch, prior = PAPER[name]
    frames = int(name.split("_")[1].removesuffix("f"))
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.data.batch_size, cfg.objective.t_prior) == (lr, wd, batch, prior)
    assert cfg.optim.betas == (0.9, 0.95) and cfg.objective.mask_schedule == "linear"
    assert cfg.model.latent_shape == (frames // 4, 16, 16) and cfg.model.vocab_size == 16384
    assert cfg.model.dropout == (0.1 if name.startswith("sky") else 0.0)
    assert cfg.sampling == PRESETS[name]
    with torch.device("meta"):
        model = MeBT(cfg.model)
    # 337.2M with embeddings and head at 16 frames; 128 frames add 7168 x 1024 position embeddings.
    assert model.num_params() == pytest.approx(337.2e6 + (cfg.model.block_size - 1024) * 1024, abs=0.1e6)
    ds = deepspeed_config(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, global_batch_size=None)),
                          8, "cuda")
    assert ds["train_batch_size"] == 8 * batch and ds["bf16"]["enabled"]


def test_every_shipped_config_validates():
    for path in sorted(Path("configs").glob("*.yaml")):
        if path.name.startswith("tokenizer"):
            continue
        assert load_config(RunConfig, path).model.block_size > 0, path


def test_lr_warmup_then_constant_or_cosine():
    from mebt.train.config import OptimConfig, lr_factor

    constant = lr_factor(OptimConfig(warmup_steps=4), steps=100)
    assert [constant(s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0] and constant(99) == 1.0
    cosine = lr_factor(OptimConfig(warmup_steps=10, schedule="cosine", min_lr_ratio=0.1), steps=110)
    assert cosine(9) == 1.0 and cosine(10) == pytest.approx(1.0)
    assert cosine(60) == pytest.approx(0.55) and cosine(110) == pytest.approx(0.1)
    assert all(cosine(s) >= cosine(s + 1) for s in range(10, 110))
