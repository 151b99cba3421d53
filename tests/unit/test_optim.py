"""One optimizer and learning-rate schedule for both trainers: the schedule's values, the same lr per step in
the MeBT trainer and the tokenizer trainer, and the ``optim`` section read the same way by both configs."""
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from mebt.config import from_dict, load_config
from mebt.core.objective import param_groups
from mebt.errors import ConfigError
from mebt.tokenizer.vqgan import VQGAN
from mebt.train.config import RunConfig
from mebt.train.optim import OptimConfig, lr_factor, lr_scheduler, tokenizer_optim
from mebt.train.tokenizer import TokenizerRunConfig, TokenizerTrainConfig, train_step

ROOT = Path(__file__).resolve().parents[2]
SCHEDULES = [dict(lr=1e-3, warmup_steps=4),
             dict(lr=2e-3, warmup_steps=3, schedule="cosine", min_lr_ratio=0.1),
             dict(lr=5e-4, schedule="cosine")]


def test_warmup_then_constant_or_cosine():
    constant = lr_factor(OptimConfig(warmup_steps=4), steps=100)
    assert [constant(s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0] and constant(99) == 1.0
    cosine = lr_factor(OptimConfig(warmup_steps=10, schedule="cosine", min_lr_ratio=0.1), steps=110)
    assert cosine(9) == 1.0 and cosine(10) == pytest.approx(1.0)
    assert cosine(60) == pytest.approx(0.55) and cosine(110) == pytest.approx(0.1)
    assert all(cosine(s) >= cosine(s + 1) for s in range(10, 110))
    no_warmup = OptimConfig(lr=1.0, schedule="cosine", min_lr_ratio=0.1)
    assert no_warmup.lr_at(0, 100) == 1.0 and no_warmup.lr_at(50, 100) == pytest.approx(0.55)
    assert no_warmup.lr_at(99, 100) == pytest.approx(0.1, abs=1e-3) and no_warmup.lr_at(100, 100) == pytest.approx(0.1)


def mebt_lrs(cfg: OptimConfig, steps: int) -> list[float]:
    """The lr of each step as the MeBT trainer sets it up (the loop's AdamW and scheduler), stepped the way
    DeepSpeed steps them: the scheduler once after every optimizer step."""
    model = nn.Linear(2, 2)   # param_groups needs Linear weights
    optimizer = cfg.adamw(param_groups(model, cfg.weight_decay))
    scheduler = lr_scheduler(cfg, optimizer, steps)
    lrs = []
    for _ in range(steps):
        lrs.append([group["lr"] for group in optimizer.param_groups])
        model(torch.ones(1, 2)).sum().backward()
        optimizer.step()
        scheduler.step()
    assert all(len(set(step)) == 1 for step in lrs)
    return [step[0] for step in lrs]


def tokenizer_lrs(cfg: OptimConfig, steps: int) -> list[float]:
    """The lr of each step of the tokenizer trainer's own ``train_step``, on a tiny VQGAN."""
    tcfg = from_dict(TokenizerTrainConfig, {"model": {"n_hiddens": 4, "num_groups": 4, "downsample": [2, 4, 4],
                                                      "n_codes": 8, "embedding_dim": 4},
                                            "train": {"steps": steps, "device": "cpu"}})
    tcfg.optim = cfg
    torch.manual_seed(0)
    model = VQGAN(tcfg.model)
    opt = cfg.adamw(model.parameters())
    video = torch.rand(1, 3, 2, 8, 8) - 0.5
    lrs = []
    for step in range(steps):
        train_step(model, nn.ModuleDict(), opt, None, tcfg, video, step)
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


@pytest.mark.parametrize("settings", SCHEDULES, ids=["constant-warmup", "cosine-warmup", "cosine"])
def test_both_trainers_follow_the_same_schedule(settings):
    cfg, steps = OptimConfig(**settings), 8
    expected = [cfg.lr * lr_factor(cfg, steps)(s) for s in range(steps)]
    assert mebt_lrs(cfg, steps) == pytest.approx(expected, rel=1e-12)
    assert tokenizer_lrs(cfg, steps) == pytest.approx(expected, rel=1e-12)
    if cfg.warmup_steps:
        assert expected[0] == pytest.approx(cfg.lr / cfg.warmup_steps)
        assert expected[cfg.warmup_steps - 1] == pytest.approx(cfg.lr)


def test_one_optim_section_with_each_trainers_defaults():
    mebt = from_dict(RunConfig, {"data": {"data_dir": "x", "batch_size": 1}, "optim": {"lr": 1e-3}}).optim
    tokenizer = from_dict(TokenizerTrainConfig, {"optim": {"lr": 1e-3}}).optim
    assert type(mebt) is type(tokenizer) is OptimConfig
    assert mebt == OptimConfig(lr=1e-3) and mebt.betas == (0.9, 0.95) and mebt.weight_decay == 0.01
    # A partial section keeps the tokenizer's own defaults (TATS's betas, no weight decay), in YAML as in code.
    assert tokenizer == tokenizer_optim(lr=1e-3) == TokenizerTrainConfig(optim=tokenizer_optim(lr=1e-3)).optim
    assert tokenizer.betas == (0.5, 0.9) and tokenizer.weight_decay == 0.0 and tokenizer.min_lr_ratio == 0.1
    assert TokenizerTrainConfig().optim == tokenizer_optim()
    shipped = load_config(TokenizerRunConfig, ROOT / "configs" / "tokenizer_tiny.yaml").optim
    assert shipped == tokenizer_optim(lr=0.003, betas=(0.9, 0.99), warmup_steps=20, schedule="cosine")
    for cls, data in ((RunConfig, {"data": {"data_dir": "x", "batch_size": 1}}), (TokenizerTrainConfig, {})):
        for bad, pattern in (({"min_lr_ratio": 2.0}, r"config key 'optim.min_lr_ratio' must be in \[0, 1\], got 2.0"),
                             ({"warmup_steps": -1}, "config key 'optim.warmup_steps' must be non-negative"),
                             ({"lr": 0}, "config key 'optim.lr' must be positive"),
                             ({"warmup": 5}, "unknown config key 'optim.warmup' \\(did you mean 'optim.warmup_steps'")):
            with pytest.raises(ConfigError, match=pattern):
                from_dict(cls, {**data, "optim": bad})


@pytest.mark.parametrize("override, message", [
    ("optim.lr=nan", "config key 'optim.lr' must be a finite number, got nan"),
    ("optim.lr=inf", "config key 'optim.lr' must be a finite number, got inf"),
    ("optim.lr=0", "config key 'optim.lr' must be positive, got 0"),
    ("optim.eps=-1e-8", "config key 'optim.eps' must be positive, got -1e-08"),
    ("optim.betas=[0.9,1.0]", "config key 'optim.betas' must be two numbers in [0, 1), got [0.9, 1.0]"),
    ("optim.betas=[-0.1,0.9]", "config key 'optim.betas' must be two numbers in [0, 1), got [-0.1, 0.9]"),
    ("optim.weight_decay=nan", "config key 'optim.weight_decay' must be a finite number, got nan"),
    ("train.seed=-1", "config key 'train.seed' must be non-negative, got -1"),
])
def test_out_of_range_optimizer_values_and_seeds_are_refused_by_name(override, message):
    """Values that used to train on (nan/inf lr gave NaN weights) or pass silently are one-line errors."""
    with pytest.raises(ConfigError) as info:
        load_config(RunConfig, None, ["data.data_dir=codes", override])
    assert message in str(info.value) and "\n" not in str(info.value)
