import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mebt.core.flops import mebt_forward_flops, mebt_train_flops, mfu, peak_flops_per_s, peak_for_name
from mebt.core.model import MeBT
from mebt.errors import UserError
from tests.helpers import tiny_config

PLAN = ["latent_enc", "latent_self", "latent_enc", "latent_dec", "lt2l", "latent_dec"]  # every block kind


def counted_flops(model: MeBT, n_ctx: int, batch: int = 2) -> int:
    """FlopCounterMode's total for one real forward, per sample."""
    n = model.cfg.block_size
    perm = torch.rand(batch, n, generator=torch.Generator().manual_seed(0)).argsort(dim=1)
    codes = torch.randint(0, model.cfg.vocab_size, (batch, n))
    # The CPU's fused SDPA kernel has no FLOP formula registered in FlopCounterMode (it would count 0);
    # the math backend runs attention as bmm, which it counts. Grad stays enabled: FlopCounterMode's
    # module tracker fails under no_grad on this model.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(codes, perm[:, :n_ctx], perm[:, n_ctx:])
    assert counter.get_total_flops() % batch == 0
    return counter.get_total_flops() // batch


@pytest.mark.parametrize("numerics", ["official", "preln"])
@pytest.mark.parametrize("n_ctx", [0, 12, 32])
def test_forward_flops_match_flop_counter_exactly(numerics, n_ctx):
    torch.manual_seed(0)
    cfg = tiny_config(numerics=numerics, n_layer=len(PLAN), layer_plan=PLAN)
    model = MeBT(cfg).eval()
    assert counted_flops(model, n_ctx) == mebt_forward_flops(cfg, n_ctx, cfg.block_size - n_ctx)


def test_paper_plan_matches_counter_and_hand_count():
    cfg = tiny_config()  # paper plan for 4 layers: enc, self, enc, dec
    assert cfg.plan == ["latent_enc", "latent_self", "latent_enc", "latent_dec"]
    assert counted_flops(MeBT(cfg), 12) == mebt_forward_flops(cfg, 12, 20)
    d, nl, v = 32, 8, 24
    linear = lambda nq, nk: d * d * (20 * nq + 4 * nk)  # q, proj, MLP on queries; k, v on keys
    attn = lambda nq, nk: 4 * nq * nk * d
    expected = 2 * (linear(nl, 12) + attn(nl, 12)) + linear(nl, nl) + attn(nl, nl) \
        + linear(20, nl) + attn(20, nl) + 2 * 20 * d * v
    assert mebt_forward_flops(cfg, 12, 20) == expected


def test_train_is_three_forwards_and_scales():
    cfg = tiny_config(n_layer=len(PLAN), layer_plan=PLAN)
    assert mebt_train_flops(cfg, 10, 22) == 3 * mebt_forward_flops(cfg, 10, 22)
    with pytest.raises(ValueError):
        mebt_forward_flops(cfg, -1, 4)


def test_peak_table_and_cpu(monkeypatch):
    monkeypatch.delenv("MEBT_PEAK_FLOPS", raising=False)
    assert peak_flops_per_s("cpu", torch.bfloat16) is None
    assert peak_flops_per_s(torch.device("cpu"), torch.float32) is None
    assert peak_for_name("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989.5e12
    assert peak_for_name("NVIDIA H100 PCIe", torch.float16) == 756.5e12
    assert peak_for_name("NVIDIA A100-SXM4-80GB", torch.bfloat16) == 312e12
    assert peak_for_name("NVIDIA A10", torch.bfloat16) == 125e12
    assert peak_for_name("NVIDIA L4", torch.bfloat16) == 121e12
    assert peak_for_name("NVIDIA L40S", torch.bfloat16) is None  # not mistaken for an L4
    assert peak_for_name("NVIDIA A10G", torch.bfloat16) is None  # not mistaken for an A10
    assert peak_for_name("Tesla V100-SXM2-16GB", torch.bfloat16) is None  # no bf16 tensor cores
    assert peak_for_name("Tesla V100-SXM2-16GB", torch.float32) == 15.7e12
    assert peak_for_name("NVIDIA H200", torch.int8) is None
    precision = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert peak_for_name("NVIDIA H200", torch.float32) == 67e12
        torch.set_float32_matmul_precision("high")
        assert peak_for_name("NVIDIA H200", torch.float32) == 494.5e12
    finally:
        torch.set_float32_matmul_precision(precision)


def test_env_override(monkeypatch):
    monkeypatch.setenv("MEBT_PEAK_FLOPS", "1.5e14")
    assert peak_flops_per_s("cpu", torch.bfloat16) == 1.5e14
    for bad in ("fast", "-1", "inf"):
        monkeypatch.setenv("MEBT_PEAK_FLOPS", bad)
        with pytest.raises(UserError, match="MEBT_PEAK_FLOPS"):
            peak_flops_per_s("cpu", torch.bfloat16)


def test_mfu():
    assert mfu(250e12, 1000e12) == pytest.approx(0.25)
    assert mfu(1e12, None) is None
