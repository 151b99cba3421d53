"""`mebt plan`: its memory model against real saved tensors and DeepSpeed's estimators, its communication
and curriculum arithmetic, its warnings and its command."""
import json

import pytest
import torch

from benchmarks.train_scaling import saved_activation_bytes
from mebt.cli import main
from mebt.config import load_config
from mebt.core.model import MeBT, MeBTConfig
from mebt.train.config import RunConfig, model_params
from mebt.train.plan import (
    PlanJob,
    activation_bytes,
    comm_bytes,
    model_state_bytes,
    plan,
    resolve_checkpointing,
)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("shape", [dict(n_embd=64, n_head=4, n_layer=6, n_latent=16, latent_shape=(4, 8, 8),
                                        dropout=0.0, n_tgt=200),
                                   dict(n_embd=128, n_head=8, n_layer=8, n_latent=32, latent_shape=(8, 8, 8),
                                        dropout=0.1, n_tgt=300)])
def test_activation_estimate_matches_the_tensors_a_training_step_saves(shape, bf16, checkpointing):
    shape = dict(shape)
    n_tgt = shape.pop("n_tgt")
    cfg = MeBTConfig(vocab_size=512, grad_checkpoint=checkpointing, **shape)
    torch.manual_seed(0)
    model = MeBT(cfg).train()
    n = cfg.block_size
    perm = torch.randperm(n)[None]
    measured = saved_activation_bytes(model, (torch.randint(0, 512, (1, n)), perm[:, :n - n_tgt], perm[:, n - n_tgt:]),
                                      bf16)
    estimate = activation_bytes(cfg, n - n_tgt, n_tgt, "bf16" if bf16 else "fp32", checkpointing)
    assert estimate == pytest.approx(measured, rel=0.01)


def test_model_states_are_deepspeeds_own_estimates():
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cfg = load_config(PlanJob, "configs/ucf_16f.yaml")
    params, largest = model_params(cfg.model), 16384 * 1024   # the head (and the code embedding) is the largest
    for nodes in (1, 4):
        gpus = 8 * nodes
        _, zero2 = estimate_zero2_model_states_mem_needs(params, 8, nodes, cpu_offload=False)
        _, zero3, _ = estimate_zero3_model_states_mem_needs(params, largest, 8, nodes, cpu_offload=False)
        assert model_state_bytes(params, largest, 2, "bf16", gpus, False) == pytest.approx(zero2, abs=gpus)
        assert model_state_bytes(params, largest, 3, "bf16", gpus, False) == pytest.approx(zero3, abs=gpus)
    assert model_state_bytes(params, largest, 2, "bf16", 8, True) < model_state_bytes(params, largest, 2, "bf16", 8,
                                                                                      False)


def test_communication_per_gpu_follows_the_zero_stage():
    # The arithmetic: 345M parameters in bf16 on 32 GPUs move ~1.34 GB per GPU per ZeRO-2 step.
    assert comm_bytes(345e6, 2, "bf16", 32, 1) == pytest.approx(1.34e9, rel=0.01)
    assert comm_bytes(345e6, 2, "bf16", 32, 4) == pytest.approx(2.5 * comm_bytes(345e6, 2, "bf16", 32, 1))
    assert comm_bytes(345e6, 3, "bf16", 32, 1) == pytest.approx(1.5 * comm_bytes(345e6, 2, "bf16", 32, 1))
    assert comm_bytes(345e6, 1, "fp32", 32, 4) == pytest.approx(2 * comm_bytes(345e6, 1, "bf16", 32, 4))
    assert comm_bytes(345e6, 2, "bf16", 1, 1) == 0


def test_the_plan_warns_about_the_paper_configs_as_published():
    sky = plan(load_config(PlanJob, "configs/sky_128f.yaml", ["gpus=32"]))
    text = "\n".join(sky["warnings"])
    # gaussian2 over 500k steps: the preferred clip length reaches 17.7 latent frames of 32.
    assert "the curriculum never reaches full clips: P(L=32) = 1.4e-12" in text
    assert sky["steps"]["last"]["mean_clip_frames"] == pytest.approx(17.7, abs=0.05)
    assert "communication-bound at the first step" in text
    assert sky["memory_bytes"]["total_checkpointed"] < sky["memory_bytes"]["total"] < 0.85 * 80 * 2 ** 30
    # grad_checkpoint: auto (the paper configs) is off where the memory allows it, on where it does not.
    assert not sky["grad_checkpoint"] and sky["grad_checkpoint_why"].startswith("auto: off, ~39.4 GiB")
    small = plan(load_config(PlanJob, "configs/sky_128f.yaml", ["gpus=32", "gpu=a100-40gb"]))
    assert small["grad_checkpoint"] and small["grad_checkpoint_why"].startswith("auto: on") and not any(
        w.startswith("does not fit") for w in small["warnings"])
    assert small["steps"]["last"]["flops_per_gpu"] == pytest.approx(4 / 3 * sky["steps"]["last"]["flops_per_gpu"])
    forced = plan(load_config(PlanJob, "configs/sky_128f.yaml", ["gpus=32", "model.grad_checkpoint=true"]))
    assert any(w.startswith("activation checkpointing unnecessary") for w in forced["warnings"])
    one_node = plan(load_config(PlanJob, "configs/sky_16f.yaml", ["gpus=8"]))
    assert one_node["bandwidth_bytes_s"] == 450e9 and not one_node["warnings"]   # NVLink, full clips, fits
    huge = plan(load_config(PlanJob, "configs/sky_128f.yaml", ["gpus=8", "gpu=a100-40gb", "data.batch_size=32"]))
    assert any(w.startswith("does not fit") and "lower data.batch_size" in w for w in huge["warnings"])
    off = plan(load_config(PlanJob, "configs/sky_128f.yaml", ["gpu=a100-40gb", "model.grad_checkpoint=false"]))
    assert any(w.startswith("does not fit") and "set model.grad_checkpoint to true or auto" in w
               for w in off["warnings"])


def test_plan_command_prints_and_writes_json(tmp_path, capsys):
    path = tmp_path / "plan.json"
    assert main(["plan", "--config", "taichi_128f", "--gpus", "32", "--interconnect", "200gbps",
                 "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "32 x h100-80gb (200gbps between nodes)" in out and "weights + gradients + optimizer" in out
    saved = json.loads(path.read_text())
    assert saved["gpus"] == 32 and saved["bandwidth_bytes_s"] == 25e9 and saved["warnings"]
    assert main(["plan", "--config", "taichi_16f", "--gpu", "b200"]) == 2
    assert "config key 'gpu' must be one of h100-80gb" in capsys.readouterr().err
    assert main(["plan", "--config", "taichi_16f", "--gpu", "v100-32gb"]) == 2
    assert "has no bf16 units" in capsys.readouterr().err


def test_auto_checkpointing_is_resolved_from_the_gpus_memory():
    cfg = load_config(RunConfig, "configs/sky_128f.yaml")
    assert cfg.model.grad_checkpoint == "auto"
    assert resolve_checkpointing(cfg, 32, 80 * 2 ** 30)[0] is False
    assert resolve_checkpointing(cfg, 32, 40 * 2 ** 30)[0] is True
    assert resolve_checkpointing(cfg, 32, None) == (False, "auto: off on a CPU")
    fixed = load_config(RunConfig, "configs/sky_128f.yaml", ["model.grad_checkpoint=true"])
    assert resolve_checkpointing(fixed, 32, 80 * 2 ** 30) == (True, "set in the config")
