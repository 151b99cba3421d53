import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from mebt.core.model import ContextCache, MeBT, MeBTConfig, select_rows
from mebt.core.sampling import (
    PRESETS,
    SamplingConfig,
    maskgit_schedule,
    num_forward_passes,
    preset,
    sample,
    sample_head,
    sample_logits,
)
from mebt.errors import ConfigError

VOCAB = 16
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tiny_mebt(latent_shape=(2, 4, 4), device="cpu"):
    torch.manual_seed(0)
    cfg = MeBTConfig(vocab_size=VOCAB, latent_shape=latent_shape, n_layer=4, n_embd=32, n_head=4, n_latent=8)
    return MeBT(cfg).to(device).eval()


def seeded(seed, device="cpu"):
    return torch.Generator(device=device).manual_seed(seed)


def oracle_code(pos):
    return (3 * pos + 1) % VOCAB


class Recorder(nn.Module):
    """Wraps a model, checks the interface invariants of every call and records (n_ctx, n_tgt)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.cfg, self.calls, self.rows = model, model.cfg, [], []

    def forward(self, codes, ctx_idx, tgt_idx, rows=None):
        b, n = codes.shape
        assert ctx_idx.shape[0] == tgt_idx.shape[0] == b and ctx_idx.shape[1] + tgt_idx.shape[1] == n
        both = torch.sort(torch.cat([ctx_idx, tgt_idx], dim=1), dim=1).values
        assert torch.equal(both, torch.arange(n, device=codes.device).expand(b, n))  # a partition of the grid
        self.calls.append((ctx_idx.shape[1], tgt_idx.shape[1]))
        self.rows.append(None if rows is None else rows.shape[1])
        return self.model(codes, ctx_idx, tgt_idx, rows=rows)


class Oracle(nn.Module):
    """Strongly favours code oracle_code(position) for every target; checks contexts hold what it said.

    With ``few_targets`` set, it favours that code only when called with at most that many targets and
    code 0 otherwise, so only revision passes (small chunks) produce the oracle codes everywhere.
    """

    def __init__(self, n, check_contexts=True, few_targets=None):
        super().__init__()
        self.cfg = SimpleNamespace(block_size=n, vocab_size=VOCAB)
        self.check_contexts, self.few_targets = check_contexts, few_targets

    def forward(self, codes, ctx_idx, tgt_idx, rows=None):
        if self.check_contexts:
            assert torch.equal(codes.gather(1, ctx_idx), oracle_code(ctx_idx))
        want = oracle_code(tgt_idx)
        if self.few_targets is not None and tgt_idx.shape[1] > self.few_targets:
            want = torch.zeros_like(want)
        return select_rows(50.0 * nn.functional.one_hot(want, VOCAB).float(), rows)


class Table(nn.Module):
    """Context-independent logits: a fixed random table [N, V] read at the target positions."""

    def __init__(self, n, scale=1.0):
        super().__init__()
        self.cfg = SimpleNamespace(block_size=n, vocab_size=VOCAB)
        self.register_buffer("table", scale * torch.randn(n, VOCAB, generator=seeded(1)))

    def forward(self, codes, ctx_idx, tgt_idx, rows=None):
        return select_rows(self.table[tgt_idx], rows)


CONFIGS = {
    "maskgit": SamplingConfig(steps=6),
    "bootstrap": SamplingConfig(steps=6, bootstrap=3, top_k=4),
    "chunks": SamplingConfig(draft="chunks", n_draft=4),
    "revise": SamplingConfig(steps=5, n_revise=2, revise_rounds=2, revise_temperature=0.7),
    "chunks_revise": SamplingConfig(draft="chunks", n_draft=8, n_revise=4, revise_rounds=1, top_p=0.9),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_shape_range_and_pass_count(name, device):
    cfg = CONFIGS[name]
    model = Recorder(tiny_mebt(device=device))
    out = sample(model, cfg, 3, generator=seeded(0, device))
    assert out.shape == (3, 32) and out.dtype == torch.long and out.device.type == device
    assert out.min() >= 0 and out.max() < VOCAB
    assert len(model.calls) == num_forward_passes(cfg, 32)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_oracle_codes_are_returned_exactly(name):
    out = sample(Oracle(32), CONFIGS[name], 4, generator=seeded(0))
    assert torch.equal(out, oracle_code(torch.arange(32)).expand(4, 32))


def test_revision_resamples_every_free_position():
    model = Oracle(32, check_contexts=False, few_targets=16)
    draft = sample(model, SamplingConfig(draft="chunks", n_draft=1), 2, generator=seeded(0))
    assert (draft == 0).all()  # one pass with all 32 targets: the draft is all zeros
    revised = sample(model, SamplingConfig(draft="chunks", n_draft=1, n_revise=2, revise_rounds=1), 2,
                     generator=seeded(0))
    assert torch.equal(revised, oracle_code(torch.arange(32)).expand(2, 32))


def test_pass_counts_and_chunk_sizes_of_draft_and_revision():
    model = Recorder(Oracle(32))
    cfg = SamplingConfig(draft="chunks", n_draft=4, n_revise=8, revise_rounds=2)
    sample(model, cfg, 2, generator=seeded(0))
    assert model.calls == [(0, 32), (8, 24), (16, 16), (24, 8)] + [(28, 4)] * 16


def cosine_ctx_counts(steps, n, start=0):
    """Context count at each MaskGIT pass, from the reference formula; steps adding nothing make no pass."""
    counts, ctx = [], start
    for k in range(steps):
        t = (k + 1) / steps
        after = n - (0 if k + 1 == steps else math.ceil(math.cos(math.pi * t / 2) * n))
        if after > ctx:
            counts.append(ctx)
            ctx = after
    assert ctx == n
    return counts


@pytest.mark.parametrize("steps,bootstrap", [(8, 0), (5, 0), (8, 4)])
def test_context_counts_follow_the_cosine_schedule(steps, bootstrap):
    model = Recorder(tiny_mebt())
    cfg = SamplingConfig(steps=steps, bootstrap=bootstrap)
    sample(model, cfg, 2, generator=seeded(0))
    ctx = [c for c, _ in model.calls]
    assert ctx == list(range(bootstrap)) + cosine_ctx_counts(steps, 32, bootstrap)
    assert len(model.calls) == num_forward_passes(cfg, 32)


def test_conditional_schedule_runs_over_the_free_positions():
    model = Recorder(tiny_mebt())
    given = torch.zeros(32, dtype=torch.bool)
    given[:16] = True
    cfg = SamplingConfig(steps=4)
    sample(model, cfg, 2, given_codes=torch.zeros(2, 32, dtype=torch.long), given_mask=given, generator=seeded(0))
    assert [c for c, _ in model.calls] == [16 + c for c in cosine_ctx_counts(4, 16)]
    assert len(model.calls) == num_forward_passes(cfg, 16)


def frames_mask(latent_shape, frames):
    mask = torch.zeros(latent_shape, dtype=torch.bool)
    mask[list(frames)] = True
    return mask.flatten()


@pytest.mark.parametrize("latent_shape,frames", [((2, 4, 4), [0]), ((3, 4, 4), [0, 2])])
@pytest.mark.parametrize("name", ["maskgit", "chunks", "revise", "chunks_revise"])
def test_given_frames_are_kept_exactly(latent_shape, frames, name):
    model = tiny_mebt(latent_shape)
    n = model.cfg.block_size
    given_codes = torch.randint(0, VOCAB, (3, n), generator=seeded(5))
    mask = frames_mask(latent_shape, frames)
    out = sample(model, CONFIGS[name], 3, given_codes=given_codes, given_mask=mask, generator=seeded(0))
    assert torch.equal(out[:, mask], given_codes[:, mask])
    assert out.min() >= 0 and out.max() < VOCAB


def test_per_sample_given_positions_survive_revision_against_the_model():
    # The oracle would overwrite given codes with its own; different positions per sample, same count.
    n = 32
    mask = torch.zeros(2, n, dtype=torch.bool)
    mask[0, :8] = True
    mask[1, -8:] = True
    given_codes = (oracle_code(torch.arange(n)) + 5) % VOCAB
    given_codes = given_codes.expand(2, n)
    cfg = SamplingConfig(steps=4, n_revise=4, revise_rounds=2)
    out = sample(Oracle(n, check_contexts=False), cfg, 2, given_codes=given_codes, given_mask=mask,
                 generator=seeded(0))
    expected = torch.where(mask, given_codes, oracle_code(torch.arange(n)))
    assert torch.equal(out, expected)


def test_unequal_given_counts_are_rejected():
    mask = torch.zeros(2, 32, dtype=torch.bool)
    mask[0, :8] = True
    mask[1, :9] = True
    with pytest.raises(ValueError, match="same number of positions"):
        sample(tiny_mebt(), SamplingConfig(steps=4), 2, given_codes=torch.zeros(2, 32, dtype=torch.long),
               given_mask=mask)


@pytest.mark.parametrize("name", ["maskgit", "bootstrap", "chunks_revise"])
def test_same_seed_same_output_different_seed_different(name):
    model = Table(32)
    first, again, other = (sample(model, CONFIGS[name], 4, generator=seeded(s)) for s in (7, 7, 8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_top_k_1_and_tiny_top_p_return_the_argmax():
    model = Table(32)
    argmax = model.table.argmax(dim=-1).expand(4, 32)
    for cfg in (SamplingConfig(steps=4, top_k=1), SamplingConfig(steps=4, top_p=1e-6),
                SamplingConfig(draft="chunks", n_draft=2, n_revise=2, revise_rounds=1, top_k=1, revise_top_k=1),
                SamplingConfig(draft="chunks", n_draft=2, n_revise=2, revise_rounds=1, revise_top_p=1e-6),
                SamplingConfig(steps=4, top_k=1, bootstrap=8, bootstrap_top_k=1),
                SamplingConfig(steps=4, top_k=1, bootstrap=8, bootstrap_top_p=1e-6)):
        assert torch.equal(sample(model, cfg, 4, generator=seeded(3)), argmax)
    assert not torch.equal(sample(model, SamplingConfig(steps=4), 4, generator=seeded(3)), argmax)


def test_draft_top_k_leaves_bootstrap_and_revision_unfiltered():
    # As in the published 128f scripts: top_k is the draft's; bootstrap and revision sample the full softmax.
    model = Table(32)
    argmax = model.table.argmax(dim=-1).expand(4, 32)
    bootstrapped = sample(model, SamplingConfig(steps=4, top_k=1, bootstrap=8), 4, generator=seeded(3))
    misses = (bootstrapped != argmax).sum(dim=1)
    assert misses.sum() > 0 and (misses <= 8).all()  # only the 8 bootstrap positions per sample can miss
    revised = SamplingConfig(draft="chunks", n_draft=2, n_revise=2, revise_rounds=1, top_k=1)
    assert not torch.equal(sample(model, revised, 4, generator=seeded(3)), argmax)


def test_each_phase_samples_with_its_own_settings(monkeypatch):
    import mebt.core.sampling

    seen = []

    def spy(logits, temperature, top_k=None, top_p=None, generator=None):
        seen.append((temperature, top_k, top_p))
        return sample_logits(logits, temperature, top_k, top_p, generator)

    monkeypatch.setattr(mebt.core.sampling, "sample_logits", spy)
    phases = dict(steps=4, bootstrap=3, n_revise=2, revise_rounds=2)
    n_maskgit = num_forward_passes(SamplingConfig(**phases), 32) - 3 - 4
    draft = dict(temperature=0.9, top_k=5, top_p=0.8)
    sample(Oracle(32), SamplingConfig(**phases, **draft, revise_temperature=0.7), 2, generator=seeded(0))
    assert seen == [(1.0, None, None)] * 3 + [(0.9, 5, 0.8)] * n_maskgit + [(0.7, None, None)] * 4
    seen.clear()
    sample(Oracle(32), SamplingConfig(**phases, **draft, bootstrap_temperature=0.5, bootstrap_top_k=3,
                                      bootstrap_top_p=0.6, revise_top_k=2, revise_top_p=0.95), 2, generator=seeded(0))
    assert seen == [(0.5, 3, 0.6)] * 3 + [(0.9, 5, 0.8)] * n_maskgit + [(1.0, 2, 0.95)] * 4
    seen.clear()
    sample(Oracle(32), SamplingConfig(draft="chunks", n_draft=2, n_revise=4, revise_rounds=1, **draft), 2,
           generator=seeded(0))
    assert seen == [(0.9, 5, 0.8)] * 2 + [(1.0, None, None)] * 4


def test_revision_uses_its_own_temperature():
    model = Table(32, scale=3.0)
    argmax = model.table.argmax(dim=-1).expand(4, 32)
    draft = SamplingConfig(draft="chunks", n_draft=1)
    assert not torch.equal(sample(model, draft, 4, generator=seeded(0)), argmax)
    cold_revision = SamplingConfig(draft="chunks", n_draft=1, n_revise=2, revise_rounds=1, revise_temperature=1e-3)
    assert torch.equal(sample(model, cold_revision, 4, generator=seeded(0)), argmax)


class CommitOrder(Recorder):
    """Records the contexts of the second call: the positions the first MaskGIT step committed."""

    def forward(self, codes, ctx_idx, tgt_idx, rows=None):
        if len(self.calls) == 1:
            self.first_committed = ctx_idx
        return super().forward(codes, ctx_idx, tgt_idx, rows)


def test_choice_temperature_trades_confidence_for_randomness():
    table = Table(32)
    table.table[:8] = 0.0
    table.table[:8, 0] = 20.0  # positions 0-7 are certain, the rest are uniform
    greedy, noisy = CommitOrder(table), CommitOrder(table)
    sample(greedy, SamplingConfig(steps=4, ctemp=0.0), 8, generator=seeded(0))
    sample(noisy, SamplingConfig(steps=4, ctemp=100.0), 8, generator=seeded(0))
    assert greedy.first_committed.shape == (8, 2) and (greedy.first_committed < 8).all()
    assert (noisy.first_committed >= 8).any()


class ContextSets(Recorder):
    """Records the context positions of every call, sorted per sample."""

    def forward(self, codes, ctx_idx, tgt_idx, rows=None):
        self.contexts = getattr(self, "contexts", []) + [ctx_idx.sort(dim=1).values]
        return super().forward(codes, ctx_idx, tgt_idx, rows)


def replay_maskgit(table, cfg, batch, seed, tau):
    """MaskGIT by hand for a context-free model: the same random draws as ``sample``, with ``tau(k)`` as the
    choice temperature of pass k. Returns the codes and the (sorted) contexts of every pass."""
    g = seeded(seed)
    n = table.shape[0]
    codes = torch.zeros(batch, n, dtype=torch.long)
    known = torch.zeros(batch, n, dtype=torch.bool)
    contexts = []
    for k, n_new in maskgit_schedule(cfg, n):
        contexts.append(known.nonzero()[:, 1].view(batch, -1))
        tgt = (~known).nonzero()[:, 1].view(batch, -1)
        drawn, confidence = sample_logits(table[tgt], cfg.temperature, generator=g)
        if tau(k) > 0:  # rank by p / E^tau, E ~ Exp(1)
            confidence = confidence - tau(k) * torch.empty_like(confidence).exponential_(generator=g).log()
        pick = confidence.topk(n_new, dim=1).indices
        pos = tgt.gather(1, pick)
        codes.scatter_(1, pos, drawn.gather(1, pick))
        known.scatter_(1, pos, True)
    return codes, contexts


def test_choice_temperature_of_each_pass_uses_the_count_time():
    # Official: tau = ctemp * (1 - (k+1)/n) at pass k of n, the t_next that also sets the count (0 at the
    # last pass); one step late, (1 - k/n), ranks the same draws differently.
    table = Table(32, scale=3.0)
    cfg = SamplingConfig(steps=6, ctemp=3.0)
    rec = ContextSets(table)
    out = sample(rec, cfg, 4, generator=seeded(2))
    codes, contexts = replay_maskgit(table.table, cfg, 4, 2, lambda k: cfg.ctemp * (1 - (k + 1) / cfg.steps))
    assert torch.equal(out, codes)
    assert len(rec.contexts) == len(contexts) and all(map(torch.equal, rec.contexts, contexts))
    _, late_contexts = replay_maskgit(table.table, cfg, 4, 2, lambda k: cfg.ctemp * (1 - k / cfg.steps))
    assert not all(map(torch.equal, rec.contexts, late_contexts))


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_code_frequencies_match_the_tempered_distribution(temperature):
    # Random chunks are unbiased for a context-free model (MaskGIT's confidence ranking is not, by design).
    model = Table(32)
    cfg = SamplingConfig(draft="chunks", n_draft=2, temperature=temperature)
    out = sample(model, cfg, 2000, generator=seeded(0))
    freq = nn.functional.one_hot(out, VOCAB).float().mean(dim=0)
    assert (freq - (model.table / temperature).softmax(dim=-1)).abs().max() < 0.06


def test_top_p_samples_stay_in_the_nucleus():
    logits = torch.tensor([[[3.0, 2.5, 1.0, 0.0, -1.0]]]).expand(1, 500, 5)
    codes, logp = sample_logits(logits, 1.0, top_p=0.8, generator=seeded(0))
    probs = logits[0, 0].softmax(-1)  # 0.50, 0.30, 0.07, ...: the nucleus for 0.8 is {0, 1}
    assert set(codes.unique().tolist()) == {0, 1}
    nucleus = probs[:2] / probs[:2].sum()
    assert torch.allclose(logp.exp(), nucleus[codes])


PUBLISHED = {  # reference section 3: steps, ctemp, draft top_k, bootstrap, n_revise, M, revise temperature
    "sky_16f": (32, 8.0, None, 0, 2, 2, 0.7),
    "taichi_16f": (64, 2.0, None, 0, 2, 8, 0.3),
    "ucf_16f": (128, 6.0, None, 0, 4, 4, 0.7),
    "sky_128f": (32, 4.0, 32, 64, 2, 2, 0.7),
    "taichi_128f": (32, 4.0, 32, 64, 2, 4, 0.1),
    "ucf_128f": (32, 2.0, 32, 64, 32, 2, 0.1),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_presets_match_the_reference_table(name):
    cfg = preset(name)
    values = (cfg.steps, cfg.ctemp, cfg.top_k, cfg.bootstrap, cfg.n_revise, cfg.revise_rounds, cfg.revise_temperature)
    assert values == PUBLISHED[name]
    assert cfg.draft == "maskgit" and cfg.temperature == 1.0 and cfg.top_p is None
    # The scripts bootstrap at temperature 1 and revise without top-k/top-p (--revise_k/--revise_p unset).
    assert (cfg.bootstrap_temperature, cfg.bootstrap_top_k, cfg.bootstrap_top_p) == (1.0, None, None)
    assert (cfg.revise_top_k, cfg.revise_top_p) == (None, None)
    n = 1024 if name.endswith("16f") else 8192
    draft = len(cosine_ctx_counts(cfg.steps, n, cfg.bootstrap))
    assert num_forward_passes(cfg, n) == cfg.bootstrap + draft + cfg.n_revise * cfg.revise_rounds
    cfg.steps = 1
    assert preset(name).steps == PUBLISHED[name][0]  # a copy: editing it leaves the preset alone


def test_presets_cover_exactly_the_table_and_unknown_names_list_them():
    assert set(PRESETS) == set(PUBLISHED)
    with pytest.raises(ConfigError, match="known: sky_16f"):
        preset("sky_64f")


@pytest.mark.parametrize("kwargs,key", [
    (dict(steps=0), "steps"),
    (dict(temperature=0.0), "temperature"),
    (dict(revise_temperature=-1.0), "revise_temperature"),
    (dict(bootstrap_temperature=0.0), "bootstrap_temperature"),
    (dict(top_k=0), "top_k"),
    (dict(bootstrap_top_k=0), "bootstrap_top_k"),
    (dict(revise_top_k=-2), "revise_top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(bootstrap_top_p=1.5), "bootstrap_top_p"),
    (dict(revise_top_p=0.0), "revise_top_p"),
    (dict(ctemp=-1.0), "ctemp"),
    (dict(bootstrap=-1), "bootstrap"),
    (dict(bootstrap=8, bootstrap_passes=0), "bootstrap_passes"),
    (dict(bootstrap=8, bootstrap_passes=9), "bootstrap_passes"),
    (dict(draft="random"), "draft"),
    (dict(draft="chunks"), "n_draft"),
    (dict(n_draft=4), "n_draft"),
    (dict(draft="chunks", n_draft=4, bootstrap=2), "bootstrap"),
    (dict(n_revise=2), "n_revise"),
    (dict(revise_rounds=2), "n_revise"),
    (dict(n_revise=-1, revise_rounds=1), "n_revise"),
])
def test_invalid_configs_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        SamplingConfig(**kwargs)


@pytest.mark.parametrize("cfg,key", [
    (SamplingConfig(draft="chunks", n_draft=5), "n_draft"),
    (SamplingConfig(n_revise=3, revise_rounds=1), "n_revise"),
    (SamplingConfig(bootstrap=32), "bootstrap"),
])
def test_chunk_counts_must_fit_the_generated_positions(cfg, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        sample(Oracle(32), cfg, 1)


def test_progress_bar_counts_the_passes(capsys):
    cfg = CONFIGS["revise"]
    sample(Oracle(32), cfg, 1, generator=seeded(0), progress=True)
    total = num_forward_passes(cfg, 32)
    assert f"{total}/{total}" in capsys.readouterr().err


def paper_like_mebt(vocab=128, latent_shape=(4, 8, 8)):
    """Every block kind ([enc, self, enc, dec, lt2l, dec]), a vocabulary above the presets' top-k (32) and
    a grid every preset's bootstrap and chunk counts fit, with and without a given first frame."""
    torch.manual_seed(0)
    cfg = MeBTConfig(vocab_size=vocab, latent_shape=latent_shape, n_layer=6, n_embd=32, n_head=4, n_latent=8)
    model = MeBT(cfg).eval()
    with torch.no_grad():
        model.head.weight.mul_(4.0)   # peaked distributions, as a trained model's: top-k and ranks matter
    return model


@pytest.mark.parametrize("name", list(PRESETS))
def test_fast_passes_give_the_codes_of_full_passes_for_every_preset(name):
    model, cfg = paper_like_mebt(), preset(name)
    first_frame = torch.arange(256) < 64
    for batch in (1, 3):
        given = torch.randint(0, 128, (batch, 256), generator=seeded(5))
        for condition in ({}, {"given_codes": given, "given_mask": first_frame}):
            fast = sample(model, cfg, batch, generator=seeded(11), **condition)
            full = sample(model, cfg, batch, generator=seeded(11), fast=False, **condition)
            assert torch.equal(fast, full), (name, batch, bool(condition))
            assert len(fast.unique()) > 32   # not a degenerate model that always says the same


class Shapes:
    """Records the row count of every call of some modules: a forward pre-hook on each."""

    def __init__(self, **modules):
        self.rows = {name: [] for name in modules}
        for name, module in modules.items():
            module.register_forward_pre_hook(lambda m, args, name=name: self.rows[name].append(args[0].shape[-2]))


def unknown_before_each_pass(cfg, n):
    """The number of targets of each MaskGIT pass (after ``cfg.bootstrap`` single commits)."""
    out, known = [], cfg.bootstrap
    for _, n_new in maskgit_schedule(cfg, n):
        out.append(n - known)
        known += n_new
    return out


def test_fast_passes_run_the_last_block_and_head_on_the_committed_rows_only():
    model = paper_like_mebt()
    cfg = SamplingConfig(steps=4, bootstrap=3, n_revise=4, revise_rounds=1)
    seen = Shapes(last=model.blocks[-1], head=model.head)
    fast = sample(model, cfg, 2, generator=seeded(0))
    # bootstrap passes need one row, MaskGIT passes every target, revision passes their chunk (256 / 4)
    assert seen.rows["last"] == [1, 1, 1] + unknown_before_each_pass(cfg, 256) + [64] * 4
    # The head sees the batch's rows as one (flat) chunk: they fit in LOGIT_CHUNK_ELEMENTS.
    assert seen.rows["head"] == [2 * rows for rows in seen.rows["last"]]
    seen.rows = {"last": [], "head": []}
    assert torch.equal(sample(model, cfg, 2, generator=seeded(0), fast=False), fast)
    assert seen.rows["last"][:3] == [256, 255, 254] and seen.rows["last"] == seen.rows["head"]


def test_bootstrap_passes_commit_the_bootstrap_tokens_in_fewer_passes():
    model = paper_like_mebt()
    official, grouped = preset("sky_128f"), preset("sky_128f")
    grouped.bootstrap_passes = 3   # 64 tokens: groups of 22, 21, 21
    seen = Shapes(last=model.blocks[-1])
    out = sample(model, grouped, 2, generator=seeded(0))
    assert num_forward_passes(grouped, 256) == num_forward_passes(official, 256) - 61
    assert len(seen.rows["last"]) == num_forward_passes(grouped, 256) and seen.rows["last"][:4] == [22, 21, 21, 192]
    assert out.shape == (2, 256)
    grouped.bootstrap_passes = 64   # one token per pass: the official procedure
    assert torch.equal(sample(model, grouped, 2, generator=seeded(0)), sample(model, official, 2, generator=seeded(0)))


def test_contexts_keys_and_values_are_computed_once_per_position_and_code(monkeypatch):
    model = paper_like_mebt()
    cfg = SamplingConfig(steps=8)
    seen = Shapes(key=model.blocks[0].attn.key, value=model.blocks[2].attn.value)
    fast = sample(model, cfg, 2, generator=seeded(0))
    # Every position becomes a context once, except those the last pass commits (never read again).
    last = maskgit_schedule(cfg, 256)[-1][1]
    assert sum(seen.rows["key"]) == sum(seen.rows["value"]) == 2 * (256 - last)
    monkeypatch.setattr("mebt.core.sampling.CONTEXT_CACHE_MAX_BYTES", 0)   # too large: every pass projects all
    seen.rows = {"key": [], "value": []}
    assert torch.equal(sample(model, cfg, 2, generator=seeded(0)), fast)
    n_ctx = [256 - unknown for unknown in unknown_before_each_pass(cfg, 256)]
    assert seen.rows["key"] == n_ctx and seen.rows["key"] == seen.rows["value"]


def test_the_context_cache_recomputes_a_position_whose_code_changed():
    model = paper_like_mebt()
    codes = torch.randint(0, 128, (2, 256), generator=seeded(1))
    ctx_idx = torch.stack([torch.randperm(256, generator=seeded(s))[:100] for s in (2, 3)])
    cache = ContextCache()
    with torch.no_grad():
        cache.update(model, codes, ctx_idx)
        codes[0, ctx_idx[0, 7]] = (codes[0, ctx_idx[0, 7]] + 1) % 128   # a revision changed one context
        cache.update(model, codes, ctx_idx)
        for i in (0, 2):   # the latent_enc blocks
            k, v = model.blocks[i].kv_proj(model.tok_emb(codes.gather(1, ctx_idx)) + model.pos_emb[ctx_idx])
            cached_k, cached_v = cache.get(i, ctx_idx)
            assert torch.allclose(cached_k, k, atol=1e-6) and torch.allclose(cached_v, v, atol=1e-6)


@pytest.mark.parametrize("top_k,top_p,temperature", [(None, None, 1.0), (None, None, 0.7), (32, None, 1.0),
                                                     (None, 0.9, 0.7), (5, 0.6, 1.3)])
def test_sampling_from_features_in_chunks_of_rows_draws_what_sampling_the_whole_logits_does(top_k, top_p,
                                                                                           temperature):
    head = paper_like_mebt().head
    features = torch.randn(3, 50, 32, generator=seeded(4))
    with torch.no_grad():
        whole = sample_logits(head(features), temperature, top_k, top_p, seeded(9))
        chunked = sample_head(head, features, temperature, top_k, top_p, seeded(9), chunk_elements=7 * 128)
    assert torch.equal(whole[0], chunked[0]) and torch.allclose(whole[1], chunked[1], atol=1e-5)


def test_inverse_cdf_sampling_never_picks_filtered_codes():
    logits = torch.randn(64, 50, VOCAB, generator=seeded(3))
    for top_k, top_p in ((3, None), (None, 0.5), (5, 0.6)):
        codes, logp = sample_logits(logits, 1.0, top_k, top_p, generator=seeded(4))
        assert torch.isfinite(logp).all()
        if top_k:
            allowed = logits.topk(top_k, dim=-1).indices
            assert (allowed == codes[..., None]).any(-1).all()
