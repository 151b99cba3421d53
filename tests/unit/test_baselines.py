import pytest
import torch

from mebt.core.baselines import AutoregressiveTransformer, FullAttentionTransformer, KVCache
from mebt.core.model import MeBTConfig

B, N, V = 2, 2 * 3 * 4, 37


def tiny_cfg(**kw) -> MeBTConfig:
    return MeBTConfig(vocab_size=V, latent_shape=(2, 3, 4), n_layer=2, n_embd=32, n_head=4, n_latent=8, **kw)


def split(seed: int = 0, n_ctx: int = 10, n_tgt: int = 9):
    """Per-sample random context/target positions (disjoint; some positions are neither)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.stack([torch.randperm(N, generator=g) for _ in range(B)])
    return perm[:, :n_ctx], perm[:, n_ctx:n_ctx + n_tgt]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_full_attention_shape_and_backward():
    model = FullAttentionTransformer(tiny_cfg())
    codes = torch.randint(0, V, (B, N))
    ctx, tgt = split()
    logits = model(codes, ctx, tgt)
    assert logits.shape == (B, tgt.shape[1], V)
    logits.logsumexp(-1).sum().backward()
    assert model.tok_emb.weight.grad is not None and model.mask_emb.grad is not None


def test_full_attention_ignores_target_codes_but_reads_contexts():
    model = FullAttentionTransformer(tiny_cfg()).eval()
    codes = torch.randint(0, V, (B, N))
    ctx, tgt = split()
    ref = model(codes, ctx, tgt)
    changed = codes.clone()
    changed.scatter_(1, tgt, (codes.gather(1, tgt) + 1) % V)   # every target gets another code
    assert torch.equal(model(changed, ctx, tgt), ref)
    changed = codes.clone()
    changed[0, ctx[0, 0]] = (codes[0, ctx[0, 0]] + 1) % V      # one context of sample 0
    out = model(changed, ctx, tgt)
    assert not torch.allclose(out[0], ref[0])
    assert torch.equal(out[1], ref[1])                          # samples stay independent


def test_full_attention_grad_checkpoint_matches():
    torch.manual_seed(1)
    plain = FullAttentionTransformer(tiny_cfg())
    ckpt = FullAttentionTransformer(tiny_cfg(grad_checkpoint=True))
    ckpt.load_state_dict(plain.state_dict())
    codes = torch.randint(0, V, (B, N))
    ctx, tgt = split()
    grads = []
    for model in (plain, ckpt):
        model(codes, ctx, tgt).square().mean().backward()
        grads.append(model.pos_emb.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_autoregressive_shape_and_loss():
    model = AutoregressiveTransformer(tiny_cfg())
    codes = torch.randint(0, V, (B, N))
    assert model(codes).shape == (B, N, V)
    loss = model.loss(codes)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert model.sos.grad is not None


def test_autoregressive_is_causal():
    model = AutoregressiveTransformer(tiny_cfg()).eval()
    codes = torch.randint(0, V, (B, N))
    ref = model(codes)
    for j in (0, 5, N - 1):
        changed = codes.clone()
        changed[:, j] = (codes[:, j] + 1) % V
        out = model(changed)
        assert torch.equal(out[:, :j + 1], ref[:, :j + 1]), f"code {j} leaked into logits <= {j}"
        if j < N - 1:
            assert not torch.allclose(out[:, j + 1:], ref[:, j + 1:])


def test_cached_generation_matches_uncached_forward():
    model = AutoregressiveTransformer(tiny_cfg()).eval()
    codes, logits = model.generate(B, top_k=1, return_logits=True)
    assert codes.shape == (B, N)
    full = model(codes)
    torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-4)
    assert torch.equal(full.argmax(-1), codes)                  # greedy = argmax of the full forward


def test_generation_with_prefix_keeps_it_and_matches_forward():
    model = AutoregressiveTransformer(tiny_cfg()).eval()
    prefix = torch.randint(0, V, (B, 7))
    g = torch.Generator().manual_seed(3)
    codes, logits = model.generate(B, temperature=0.8, top_k=5, prefix=prefix, generator=g, return_logits=True)
    assert torch.equal(codes[:, :7], prefix)
    assert codes.min() >= 0 and codes.max() < V
    torch.testing.assert_close(logits, model(codes), atol=1e-5, rtol=1e-4)
    # Each sampled code is among the 5 most likely under its own logits.
    top5 = logits[:, 7:].topk(5, dim=-1).indices
    assert (top5 == codes[:, 7:, None]).any(-1).all()


def test_generation_is_reproducible_with_a_generator():
    model = AutoregressiveTransformer(tiny_cfg()).eval()
    a = model.generate(1, generator=torch.Generator().manual_seed(5))
    b = model.generate(1, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_kv_cache_appends_and_refuses_overflow():
    cache = KVCache(max_len=3)
    k, v = cache.update(torch.ones(1, 2, 2, 4), torch.zeros(1, 2, 2, 4))
    assert k.shape == (1, 2, 2, 4) and cache.length == 2
    k, v = cache.update(torch.full((1, 2, 1, 4), 2.0), torch.ones(1, 2, 1, 4))
    assert k.shape == (1, 2, 3, 4) and k[0, 0, 2, 0] == 2.0 and v[0, 0, 0, 0] == 0.0
    with pytest.raises(ValueError, match="cannot append"):
        cache.update(torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4))


def test_sliding_window_generation_makes_one_frame_at_a_time_after_the_previous_window():
    # A 2-frame window of 12 codes per frame makes 5 frames: the first window, then each frame generated
    # after a prefill of the one frame before it (TATS's long-video sampling).
    model = AutoregressiveTransformer(tiny_cfg()).eval()
    codes = model.generate_sliding(B, 5, generator=torch.Generator().manual_seed(4))
    assert codes.shape == (B, 60) and codes.min() >= 0 and codes.max() < V
    g = torch.Generator().manual_seed(4)
    window = model.generate(B, generator=g)
    assert torch.equal(codes[:, :24], window)
    for frame in range(2, 5):   # the same random stream, continued frame by frame
        window = model.generate(B, prefix=codes[:, (frame - 1) * 12:frame * 12], generator=g)
        assert torch.equal(codes[:, frame * 12:(frame + 1) * 12], window[:, 12:])
    with pytest.raises(ValueError, match="at least the model's window"):
        model.generate_sliding(B, 1)
