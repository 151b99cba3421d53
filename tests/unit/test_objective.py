import math

import pytest
import torch
import torch.nn.functional as F

from mebt.core.model import MeBT
from mebt.core.objective import (
    MASK_SCHEDULES,
    ObjectiveConfig,
    chunked_masked_loss,
    clip_length_probs,
    masked_loss,
    param_groups,
    sample_masks,
)
from mebt.errors import ConfigError
from tests.helpers import tiny_config


def test_schedules_go_from_all_masked_to_none():
    for name, fn in MASK_SCHEDULES.items():
        assert fn(0.0) == pytest.approx(1.0) and fn(1.0) == pytest.approx(0.0, abs=1e-12), name
    assert MASK_SCHEDULES["linear"](0.25) == pytest.approx(0.75)
    assert MASK_SCHEDULES["cosine"](0.5) == pytest.approx(math.cos(math.pi / 4))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_masks_partition_the_grid_with_the_scheduled_count(schedule):
    cfg = ObjectiveConfig(mask_schedule=schedule)
    g = torch.Generator().manual_seed(3)
    for step in range(20):
        m = sample_masks(cfg, 4, (2, 4, 4), step, g)
        n_masked = min(max(math.ceil(m.mask_ratio * 32), 1), 32)
        assert m.ctx_idx.shape == (4, 32 - n_masked) and m.tgt_idx.shape == (4, n_masked)
        assert m.n_masked == n_masked
        both = torch.cat([m.ctx_idx, m.tgt_idx], 1).sort(1).values
        assert torch.equal(both, torch.arange(32).expand(4, 32))  # disjoint, covering every position
    # per-sample permutations differ (at a fixed half mask, where the sets cannot coincide by necessity)
    half = sample_masks(ObjectiveConfig(mask_schedule=schedule, t_range=(0.5, 0.5)), 4, (2, 4, 4), 0, g)
    assert not torch.equal(half.tgt_idx[0].sort().values, half.tgt_idx[1].sort().values)


def test_target_budget_caps_targets_and_t_range_fixes_ratio():
    cfg = ObjectiveConfig(t_range=(0.25, 0.25), target_budget=5)
    m = sample_masks(cfg, 3, (2, 4, 4), 0, torch.Generator().manual_seed(0))
    assert m.mask_ratio == pytest.approx(0.75)
    assert m.ctx_idx.shape[1] == 32 - 24 and m.tgt_idx.shape[1] == 5 and m.n_masked == 24
    assert not set(m.ctx_idx[0].tolist()) & set(m.tgt_idx[0].tolist())


def test_curriculum_windows_are_contiguous_frames_at_random_offsets():
    cfg = ObjectiveConfig(t_prior="gaussian2")
    g = torch.Generator().manual_seed(0)
    offsets = set()
    for _ in range(30):
        m = sample_masks(cfg, 8, (8, 2, 2), 30000, g)   # step 30000 -> L = 2 is the most likely length
        pos = torch.cat([m.ctx_idx, m.tgt_idx], 1)
        first_frame = pos.min(1).values // 4
        assert pos.shape[1] == m.clip_frames * 4
        assert m.n_masked == m.clip_frames * 4 - m.ctx_idx.shape[1]   # masked within the window, not the grid
        assert torch.equal(pos.sort(1).values, first_frame[:, None] * 4 + torch.arange(m.clip_frames * 4))
        offsets.update(first_frame.tolist())
    assert len(offsets) > 3


def test_curriculum_probabilities_follow_the_official_constants():
    assert clip_length_probs("longest", 8, 0).tolist() == [0.0] * 7 + [1.0]
    assert torch.allclose(clip_length_probs("uniform", 4, 99), torch.full((4,), 0.25, dtype=torch.float64))
    for prior, spread in (("gaussian2", 30000), ("gaussian100000_2", 100000)):
        for length in (1, 3, 6):
            assert int(clip_length_probs(prior, 8, (length - 1) * spread).argmax()) + 1 == length
        p = clip_length_probs(prior, 8, 0)
        w = torch.tensor([math.exp(-((l - 1) * spread) ** 2 / (2 * (2 * spread) ** 2)) for l in range(1, 9)])
        assert torch.allclose(p, (w / w.sum()).double())
        late = clip_length_probs(prior, 8, 10 ** 9)  # far past the schedule: longest clip, no 0/0
        assert torch.isfinite(late).all() and late[-1] == pytest.approx(1.0)


def test_same_generator_seed_gives_same_masks():
    a = sample_masks(ObjectiveConfig(), 2, (2, 4, 4), 0, torch.Generator().manual_seed(7))
    b = sample_masks(ObjectiveConfig(), 2, (2, 4, 4), 0, torch.Generator().manual_seed(7))
    assert torch.equal(a.ctx_idx, b.ctx_idx) and torch.equal(a.tgt_idx, b.tgt_idx)


def test_loss_is_mean_cross_entropy_over_targets_with_accuracy():
    torch.manual_seed(0)
    codes = torch.randint(0, 10, (2, 6))
    tgt = torch.tensor([[0, 2, 5], [1, 3, 4]])
    logits = torch.randn(2, 3, 10)
    loss, metrics = masked_loss(logits, codes, tgt)
    labels = codes.gather(1, tgt)
    assert loss.item() == pytest.approx(F.cross_entropy(logits.reshape(6, 10), labels.reshape(6)).item())
    perfect = F.one_hot(labels, 10).float() * 20
    loss_p, m = masked_loss(perfect, codes, tgt)
    assert m["acc1"] == 1.0 and m["acc5"] == 1.0 and loss_p.item() < 1e-6
    smoothed, _ = masked_loss(perfect, codes, tgt, label_smoothing=0.1)
    assert smoothed.item() > 0.1
    wrong = torch.zeros(2, 3, 10)
    wrong.scatter_(2, ((labels + 1) % 10).unsqueeze(-1), 20.0)
    assert masked_loss(wrong, codes, tgt)[1]["acc1"] == 0.0


def test_loss_under_a_target_budget_is_per_masked_position():
    # Official avg_loss: summed cross-entropy over the targets / (B * n_masked); accuracy stays per target.
    torch.manual_seed(0)
    codes = torch.randint(0, 10, (2, 8))
    tgt = torch.tensor([[0, 2, 5], [1, 3, 4]])   # 3 targets of the 6 masked positions per sample
    logits = torch.randn(2, 3, 10)
    labels = codes.gather(1, tgt).flatten()
    summed = F.cross_entropy(logits.reshape(6, 10), labels, reduction="sum")
    loss, metrics = masked_loss(logits, codes, tgt, n_masked=6)
    assert loss.item() == pytest.approx(summed.item() / (2 * 6))
    mean, mean_metrics = masked_loss(logits, codes, tgt)
    assert mean.item() == pytest.approx(summed.item() / 6) and metrics == mean_metrics
    assert masked_loss(logits, codes, tgt, n_masked=3)[0].item() == pytest.approx(mean.item())
    with pytest.raises(ValueError, match="below the 3 targets"):
        masked_loss(logits, codes, tgt, n_masked=2)


def test_param_groups_decay_only_linear_weights():
    model = MeBT(tiny_config())
    decay, no_decay = param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    free = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert decayed | free == set(names.values()) and not decayed & free
    assert "head.weight" in decayed and "blocks.0.attn.query.weight" in decayed and "blocks.0.mlp.2.weight" in decayed
    assert all(n.endswith(".weight") and ".ln" not in n and not n.startswith("ln_f") for n in decayed)
    assert {"tok_emb.weight", "mask_emb", "pos_emb", "latents", "ln_f.weight", "blocks.0.attn.query.bias"} <= free


def test_bad_objective_values():
    with pytest.raises(ConfigError, match="t_range"):
        ObjectiveConfig(t_range=(0.8, 0.2))
    with pytest.raises(ConfigError, match="target_budget"):
        ObjectiveConfig(target_budget=0)


@pytest.mark.parametrize("budget", [None, 9])
def test_chunked_loss_equals_plain_loss_and_gradients_and_saves_no_full_logits(budget):
    torch.manual_seed(0)
    model = MeBT(tiny_config())
    codes = torch.randint(0, 24, (2, 32))
    cfg = ObjectiveConfig(t_range=(0.3, 0.3), target_budget=budget)
    m = sample_masks(cfg, 2, (2, 4, 4), 0, torch.Generator().manual_seed(0))
    assert (m.n_masked, m.tgt_idx.shape[1]) == ((23, 23) if budget is None else (23, 9))
    logits = model(codes, m.ctx_idx, m.tgt_idx)
    plain, plain_metrics = masked_loss(logits, codes, m.tgt_idx, 0.1, n_masked=m.n_masked)
    summed = F.cross_entropy(logits.flatten(0, 1), codes.gather(1, m.tgt_idx).flatten(), label_smoothing=0.1,
                             reduction="sum")
    assert plain.item() == pytest.approx(summed.item() / (2 * 23), rel=1e-6)
    plain.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        chunked, metrics = chunked_masked_loss(model.features(codes, m.ctx_idx, m.tgt_idx), model.head, codes,
                                               m.tgt_idx, 0.1, chunk_rows=5, n_masked=m.n_masked)
    chunked.backward()
    # The accuracies stay float64 tensors (no host read per micro-batch), equal to the plain loss's floats.
    assert all(v.dtype == torch.float64 and v.dim() == 0 for v in metrics.values())
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-6)
    assert {k: v.item() for k, v in metrics.items()} == plain_metrics
    for g, p in zip(grads, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)
    assert not any(len(s) and s[-1] == 24 for s in saved)  # no [rows, vocab] logits kept for backward


def test_sample_seeds_make_each_samples_masks_its_own():
    # A sample's offset and masked positions follow its seed, not its batch or neighbours: what lets an
    # elastic resume deal a step's samples to other processes and micro-batches and draw the same masks.
    cfg = ObjectiveConfig(t_prior="gaussian2")

    def masks(seeds):
        return sample_masks(cfg, len(seeds), (8, 2, 2), 30000, shared=torch.Generator().manual_seed(5),
                            sample_seeds=seeds)

    whole, tail = masks([11, 12, 13, 14]), masks([13, 14])
    assert whole.clip_frames == tail.clip_frames and whole.n_masked == tail.n_masked
    assert torch.equal(whole.tgt_idx[2:], tail.tgt_idx) and torch.equal(whole.ctx_idx[2:], tail.ctx_idx)
    assert not torch.equal(whole.tgt_idx[0].sort().values, whole.tgt_idx[1].sort().values)
    with pytest.raises(ValueError, match="3 sample seeds for a batch of 2"):
        sample_masks(cfg, 2, (8, 2, 2), 0, shared=torch.Generator(), sample_seeds=[1, 2, 3])
