"""The shipped configs: the six paper configs match the published settings, and every config validates."""
import dataclasses

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
    from mebt.config import packaged_configs, read_config_file
    from mebt.train.tokenizer import TokenizerRunConfig

    paths = sorted(packaged_configs().glob("*.yaml"))
    assert {p.stem for p in paths} >= {"paper", "paper_128f", "demo", "demo_tokenizer", "tiny", "ucf_128f"}
    for path in paths:
        if "tokenizer" in path.stem:
            assert load_config(TokenizerRunConfig, path, ["data.root=videos"]).model.n_codes > 0, path
            continue
        # bases and the demo's config leave the dataset to the overlay or the demo
        extra = [] if "data_dir" in read_config_file(path).get("data", {}) else ["data.data_dir=codes"]
        assert load_config(RunConfig, path, extra).model.block_size > 0, path


def test_the_model_takes_the_datasets_grid_vocabulary_and_tokenizer_unless_set(tmp_path):
    from data_pipeline.manifest import write_dataset_json
    from mebt.fsutil import file_sha256
    from mebt.train.config import defaults_from_dataset

    tokenizer = tmp_path / "tok.ckpt"
    tokenizer.write_bytes(b"the tokenizer that made the codes")
    write_dataset_json(tmp_path, {"grid": [8, 16, 16], "codebook_size": 128, "tokenizer": str(tokenizer),
                                  "tokenizer_sha256": file_sha256(tokenizer)})
    data = {"data": {"data_dir": str(tmp_path)}}
    filled = defaults_from_dataset(data)
    assert filled["model"] == {"latent_shape": [8, 16, 16], "vocab_size": 128}
    assert filled["train"] == {"tokenizer": str(tokenizer)}
    cropped = defaults_from_dataset({"data": {"data_dir": str(tmp_path), "crop_frames": 3}})
    assert cropped["model"]["latent_shape"] == [3, 16, 16]
    explicit = {"data": {"data_dir": str(tmp_path)}, "model": {"latent_shape": [4, 8, 8], "vocab_size": 8},
                "train": {"tokenizer": None}}
    assert defaults_from_dataset(explicit) == explicit    # kept; the loader reports the contradiction
    tokenizer.write_bytes(b"retrained since: not the one that made the codes")
    assert "tokenizer" not in defaults_from_dataset(data)["train"]
    tokenizer.unlink()
    assert "tokenizer" not in defaults_from_dataset(data)["train"]
    nowhere = {"data": {"data_dir": str(tmp_path / "none")}}
    assert defaults_from_dataset(nowhere) == nowhere


def test_print_config_shows_the_resolved_config_with_docs(tmp_path, capsys):
    from data_pipeline.manifest import write_dataset_json
    from mebt.cli import main

    write_dataset_json(tmp_path, {"grid": [2, 4, 4], "codebook_size": 32})
    assert main(["train", "--config", "tiny", f"data.data_dir={tmp_path}", "train.steps=7", "--print-config"]) == 0
    text = capsys.readouterr().out
    assert "latent_shape: [2, 4, 4]  # T' x H' x W' code grid" in text and "vocab_size: 32" in text
    (tmp_path / "printed.yaml").write_text(text)
    again = load_config(RunConfig, tmp_path / "printed.yaml")    # what it prints loads back as the same config
    assert again == load_config(RunConfig, "tiny", [f"data.data_dir={tmp_path}", "train.steps=7",
                                                     "model.latent_shape=[2,4,4]", "model.vocab_size=32"])


def test_an_elastic_resume_keeps_the_checkpoints_clips_per_step():
    from mebt.config import to_dict
    from mebt.errors import ConfigError
    from mebt.train.config import elastic_layout

    cfg = load_config(RunConfig, "configs/tiny.yaml", ["data.data_dir=codes", "data.batch_size=4"])
    meta = {"config": to_dict(cfg), "world_size": 2, "step": 10}   # an older mebt.json: no global_batch

    def layout(world, **saved):
        out = elastic_layout(cfg, {**meta, **saved}, world)
        ds = deepspeed_config(out, world, "cpu")
        return out.data.batch_size, ds["gradient_accumulation_steps"], ds["train_batch_size"]

    assert elastic_layout(cfg, None, 3) is cfg and elastic_layout(cfg, meta, 2) is cfg
    assert layout(1) == (4, 2, 8)                         # 2 -> 1: the micro-batch stays, accumulation doubles
    assert layout(4, world_size=1) == (1, 1, 4)           # 1 -> 4: the micro-batch shrinks
    assert layout(24, global_batch=96) == (4, 1, 96)      # 32 -> 24 GPUs at 96 clips per step
    assert layout(3, global_batch=12, world_size=1) == (4, 1, 12)
    assert layout(2, global_batch=36) == (3, 6, 36)       # 18 clips each: the largest micro-batch <= 4 dividing it
    assert elastic_layout(cfg, meta, 1).data.batch_size == 4 and cfg.deepspeed.grad_accum == 1   # cfg untouched
    with pytest.raises(ConfigError, match=r"trains 128 clips per step, which 24 processes cannot share evenly; resume "
                                          r"on a process count that divides 128 \(4, 8, 16, 32, 64, 128, \.\.\.\)"):
        elastic_layout(cfg, {**meta, "global_batch": 128}, 24)


def test_resume_from_names_a_checkpoint_tag():
    from mebt.errors import ConfigError

    cfg = load_config(RunConfig, None, ["data.data_dir=codes", "resume_from=global_step55"])
    assert cfg.resume_from == "global_step55"
    with pytest.raises(ConfigError, match="--resume-from must name a checkpoint tag such as global_step500, got "
                                          "'step5'"):
        load_config(RunConfig, None, ["data.data_dir=codes", "resume_from=step5"])


def test_zero_communication_follows_the_model_size_and_extra_keys_still_win():
    from mebt.train.config import BUCKET_MIN, model_params

    def zero(name, *overrides):
        cfg = load_config(RunConfig, f"configs/{name}.yaml", ["data.data_dir=codes", *overrides])
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, global_batch_size=None))
        return cfg, deepspeed_config(cfg, 32, "cuda")["zero_optimization"]

    cfg, paper = zero("paper")
    # ~16 buckets per backward pass instead of DeepSpeed's one 5e8-element bucket (larger than the model).
    assert paper["overlap_comm"] and paper["contiguous_gradients"]
    assert paper["reduce_bucket_size"] == paper["allgather_bucket_size"] == model_params(cfg.model) // 16
    assert 20e6 < paper["reduce_bucket_size"] < 22e6
    _, three = zero("paper", "deepspeed.zero_stage=3")
    assert three["stage3_prefetch_bucket_size"] == paper["reduce_bucket_size"]
    assert three["stage3_param_persistence_threshold"] == 10 * 1024
    assert zero("tiny")[1]["reduce_bucket_size"] == BUCKET_MIN   # a small model: one bucket
    assert zero("tiny", "deepspeed.zero_stage=0")[1] == {"stage": 0}
    _, mine = zero("paper", 'deepspeed.extra={"zero_optimization": {"overlap_comm": false}}')
    assert mine["overlap_comm"] is False and mine["reduce_bucket_size"] == paper["reduce_bucket_size"]
