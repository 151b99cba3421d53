import pytest
import torch

from mebt.core.model import MeBT, MeBTConfig, paper_layer_plan
from tests.helpers import tiny_config


def split(n, n_ctx, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    perm = torch.rand(batch, n, generator=g).argsort(dim=1)
    return perm[:, :n_ctx], perm[:, n_ctx:]


def test_paper_plan_is_the_published_stack():
    plan = paper_layer_plan(24)
    assert plan == ["latent_enc", "latent_self"] * 6 + ["latent_enc"] + ["latent_dec", "lt2l"] * 5 + ["latent_dec"]
    assert MeBTConfig().plan == plan and MeBTConfig().block_size == 1024


def test_paper_size_parameter_count():
    with torch.device("meta"):
        model = MeBT(MeBTConfig())
    transformer = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("blocks.", "ln_f.", "head.")))
    assert 315e6 < transformer < 325e6  # reference: ~319M transformer parameters at d=1024, 24 layers


@pytest.mark.parametrize("numerics", ["official", "preln"])
def test_logits_shape_and_target_codes_never_leak(numerics):
    torch.manual_seed(0)
    model = MeBT(tiny_config(numerics=numerics)).eval()
    n = model.cfg.block_size
    codes = torch.randint(0, 24, (2, n))
    ctx, tgt = split(n, 12)
    logits = model(codes, ctx, tgt)
    assert logits.shape == (2, n - 12, 24)
    changed_tgt = codes.clone()
    changed_tgt.scatter_(1, tgt, (codes.gather(1, tgt) + 1) % 24)
    assert torch.equal(model(changed_tgt, ctx, tgt), logits)
    changed_ctx = codes.clone()
    changed_ctx[:, ctx[0, 0]] = (codes[:, ctx[0, 0]] + 5) % 24
    assert not torch.allclose(model(changed_ctx, ctx, tgt), logits)


def test_samples_are_independent_and_order_of_targets_only_permutes_logits(tiny_model):
    n = tiny_model.cfg.block_size
    codes = torch.randint(0, 24, (2, n))
    ctx, tgt = split(n, 10)
    logits = tiny_model(codes, ctx, tgt)
    # batch element 0 alone gives the same answer
    assert torch.allclose(tiny_model(codes[:1], ctx[:1], tgt[:1]), logits[:1], atol=1e-5)
    # shuffling the target order shuffles the logits the same way (no positional leakage via order)
    order = torch.randperm(tgt.shape[1])
    assert torch.allclose(tiny_model(codes, ctx, tgt[:, order]), logits[:, order], atol=1e-5)


def test_numerics_differ_and_official_uses_normalized_residual():
    torch.manual_seed(0)
    official = MeBT(tiny_config(numerics="official")).eval()
    preln = MeBT(tiny_config(numerics="preln")).eval()
    preln.load_state_dict(official.state_dict())  # same parameters, different residual wiring
    codes = torch.randint(0, 24, (2, 32))
    ctx, tgt = split(32, 16)
    assert not torch.allclose(official(codes, ctx, tgt), preln(codes, ctx, tgt))
    block = official.blocks[0]
    q, kv = torch.randn(1, 3, 32), torch.randn(1, 5, 32)
    ln = block.ln1
    expected = ln(q) + block.attn(ln(q), ln(kv))
    expected = expected + block.mlp(block.ln2(expected))
    assert torch.allclose(block(q, kv), expected, atol=1e-6)


def test_no_contexts_is_finite_and_equals_zero_attention(tiny_model):
    n = tiny_model.cfg.block_size
    codes = torch.randint(0, 24, (2, n))
    tgt = torch.arange(n).expand(2, n)
    logits = tiny_model(codes, tgt[:, :0], tgt)
    assert torch.isfinite(logits).all()
    # with no observed tokens every sample gets the same logits: nothing distinguishes them
    assert torch.allclose(logits[0], logits[1])


def test_gradient_checkpointing_matches_plain_backward():
    torch.manual_seed(0)
    plain = MeBT(tiny_config())
    ckpt = MeBT(tiny_config(grad_checkpoint=True))
    ckpt.load_state_dict(plain.state_dict())
    codes = torch.randint(0, 24, (2, 32))
    ctx, tgt = split(32, 16)
    for m in (plain, ckpt):
        m(codes, ctx, tgt).logsumexp(-1).mean().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_bf16_autocast_forward_backward_is_finite():
    torch.manual_seed(0)
    model = MeBT(tiny_config())
    codes = torch.randint(0, 24, (2, 32))
    ctx, tgt = split(32, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(codes, ctx, tgt)
    assert logits.dtype == torch.bfloat16
    logits.float().logsumexp(-1).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_dropout_active_only_in_training():
    torch.manual_seed(0)
    model = MeBT(tiny_config(dropout=0.5))
    codes = torch.randint(0, 24, (2, 32))
    ctx, tgt = split(32, 16)
    model.train()
    assert not torch.allclose(model(codes, ctx, tgt), model(codes, ctx, tgt))
    model.eval()
    assert torch.equal(model(codes, ctx, tgt), model(codes, ctx, tgt))


def test_embedding_dropout_covers_the_latents_in_training_only():
    # Official GPT: self.drop applies to sos_emb (the latents) as well as to contexts and targets.
    torch.manual_seed(0)
    model = MeBT(tiny_config(dropout=0.5))
    assert model.kinds[0] == "latent_enc"
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda block, args: seen.append(args[0].detach().clone()))
    codes = torch.randint(0, 24, (2, 32))
    ctx, tgt = split(32, 16)
    model.train()
    model(codes, ctx, tgt)
    latents = model.latents.detach().expand(2, -1, -1)
    kept = seen[-1] != 0
    assert 0 < kept.float().mean() < 1   # dropped elements are zero, the rest scaled by 1 / (1 - p)
    assert torch.allclose(seen[-1][kept], 2 * latents[kept])
    assert not torch.equal(kept[0], kept[1])   # a mask per sample
    model.eval()
    logits = model(codes, ctx, tgt)
    assert torch.equal(seen[-1], latents)
    plain = MeBT(tiny_config(dropout=0.0)).eval()
    plain.load_state_dict(model.state_dict())
    assert torch.equal(plain(codes, ctx, tgt), logits)


def test_fully_masked_sample_still_gives_every_parameter_a_gradient():
    # ZeRO reduces gradient buckets by layout: a rank whose step had no context tokens must still produce a
    # (zero) gradient for every projection, or its buckets mismatch the other ranks' and the collective fails.
    torch.manual_seed(0)
    model = MeBT(tiny_config())
    n = model.cfg.block_size
    codes = torch.randint(0, model.cfg.vocab_size, (2, n))
    ctx, tgt = torch.empty(2, 0, dtype=torch.long), torch.arange(n).expand(2, n)
    model(codes, ctx, tgt).sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
