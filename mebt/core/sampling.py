"""Sampling from a bidirectional model: MaskGIT drafts, chunked drafts, and draft-and-revise.

The sampler keeps, per sample, the grid of codes [B, N] and a boolean ``known`` [B, N]. Every model call
sees the known positions as contexts and all unknown positions as targets (the split MeBT is trained on:
every masked position is a target). Every step commits the same number of positions in every sample, so
the context/target counts stay equal across the batch and each call is a single batched forward pass.

- MaskGIT (published eval): at step k of n, t = (k+1)/n, every target is sampled; the most confident ones
  (log p + tau * Gumbel, tau = ctemp * (1 - t)) become contexts until only ceil(cos(pi t/2) * N) positions
  stay masked. As in the official sampler, tau uses the same t as the count: it reaches 0 at the last
  step, which commits every remaining position.
- Bootstrap (before a MaskGIT draft): ``bootstrap`` random single positions, one per pass. Not the
  published procedure: ``bootstrap_passes`` commits them in that many passes (nearly equal random groups,
  each sampled given the groups before it), the passes that dominate a 128-frame sample's compute.
- Chunks: a random permutation split into ``n_draft`` equal chunks, one committed per pass.
- Revision: ``revise_rounds`` times, a fresh permutation split into ``n_revise`` chunks; each chunk is
  resampled given all the rest.
- Conditional generation: ``given_mask`` positions hold ``given_codes`` from the start and are never
  resampled; the schedules and chunks run over the remaining free positions.

Each phase samples tokens with its own settings: ``temperature``/``top_k``/``top_p`` apply to the draft
(MaskGIT or chunks) only, ``bootstrap_*`` and ``revise_*`` to the other two phases. Their defaults are what
the published scripts pass whatever the draft uses: temperature 1 and no top-k/top-p for the bootstrap,
no top-k/top-p for revision.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from tqdm.auto import tqdm

from mebt.core.model import ContextCache, MeBT, select_rows
from mebt.errors import ConfigError


@dataclass
class SamplingConfig:
    steps: int = 32                 # MaskGIT steps
    temperature: float = 1.0        # draft (MaskGIT or chunks) token sampling temperature
    top_k: Optional[int] = None     # draft top-k
    top_p: Optional[float] = None   # draft nucleus mass
    ctemp: float = 4.5              # choice temperature tau0; at step k of n, tau = ctemp*(1-(k+1)/n)
    bootstrap: int = 0              # commit this many single random tokens, one per pass, before the schedule
    bootstrap_passes: Optional[int] = None  # NOT the official procedure: commit them in this many passes
    bootstrap_temperature: float = 1.0  # the bootstrap and revision have their own settings (module docstring)
    bootstrap_top_k: Optional[int] = None
    bootstrap_top_p: Optional[float] = None
    draft: Literal["maskgit", "chunks"] = "maskgit"
    n_draft: int = 0                # draft="chunks": number of passes, each committing an equal random chunk
    n_revise: int = 0               # revision: chunks per round (0 = no revision)
    revise_rounds: int = 0          # M rounds
    revise_temperature: float = 1.0
    revise_top_k: Optional[int] = None
    revise_top_p: Optional[float] = None

    def __post_init__(self):
        def check(ok: bool, key: str, must: str):
            if not ok:
                raise ConfigError(f"config key '{key}' {must}, got {getattr(self, key)!r}")

        check(self.steps >= 1, "steps", "must be a positive number of MaskGIT steps")
        for phase in ("", "bootstrap_", "revise_"):
            check(getattr(self, phase + "temperature") > 0, phase + "temperature", "must be > 0")
            top_k, top_p = getattr(self, phase + "top_k"), getattr(self, phase + "top_p")
            check(top_k is None or top_k >= 1, phase + "top_k", "must be None or >= 1")
            check(top_p is None or 0 < top_p <= 1, phase + "top_p", "must be None or in (0, 1]")
        check(self.ctemp >= 0, "ctemp", "must be >= 0")
        check(self.bootstrap >= 0, "bootstrap", "must be >= 0")
        check(self.bootstrap_passes is None or 1 <= self.bootstrap_passes <= max(self.bootstrap, 1),
              "bootstrap_passes", f"must be None (one pass per token, official) or in [1, bootstrap={self.bootstrap}]")
        check(self.draft in ("maskgit", "chunks"), "draft", "must be 'maskgit' or 'chunks'")
        if self.draft == "chunks":
            check(self.n_draft >= 1, "n_draft", "must be >= 1 with draft='chunks'")
            check(self.bootstrap == 0, "bootstrap", "only applies to draft='maskgit' (set bootstrap=0)")
        else:
            check(self.n_draft == 0, "n_draft", "only applies to draft='chunks' (set n_draft=0)")
        check(self.n_revise >= 0, "n_revise", "must be >= 0")
        check(self.revise_rounds >= 0, "revise_rounds", "must be >= 0")
        check((self.n_revise > 0) == (self.revise_rounds > 0), "n_revise",
              f"and revise_rounds ({self.revise_rounds}) must both be 0 (no revision) or both positive")


# The published evaluation settings (reference section 3): MaskGIT draft, then revision. The 128f scripts'
# top_k=32 is a draft setting; their bootstrap and revision passes sample with the defaults.
PRESETS: dict[str, SamplingConfig] = {
    "sky_16f": SamplingConfig(steps=32, ctemp=8.0, n_revise=2, revise_rounds=2, revise_temperature=0.7),
    "taichi_16f": SamplingConfig(steps=64, ctemp=2.0, n_revise=2, revise_rounds=8, revise_temperature=0.3),
    "ucf_16f": SamplingConfig(steps=128, ctemp=6.0, n_revise=4, revise_rounds=4, revise_temperature=0.7),
    "sky_128f": SamplingConfig(steps=32, ctemp=4.0, top_k=32, bootstrap=64, n_revise=2, revise_rounds=2,
                               revise_temperature=0.7),
    "taichi_128f": SamplingConfig(steps=32, ctemp=4.0, top_k=32, bootstrap=64, n_revise=2, revise_rounds=4,
                                  revise_temperature=0.1),
    "ucf_128f": SamplingConfig(steps=32, ctemp=2.0, top_k=32, bootstrap=64, n_revise=32, revise_rounds=2,
                               revise_temperature=0.1),
}


def preset(name: str) -> SamplingConfig:
    """A fresh copy of a published preset (callers may modify it)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown sampling preset '{name}' (known: {', '.join(PRESETS)})")
    return dataclasses.replace(PRESETS[name])


# Configs name a preset as `sampling: {preset: NAME}` (mebt.config reads it through this).
SamplingConfig.named = staticmethod(preset)


# Logits held at a time by the sampler (sample_head). On CPU 64 MiB of fp32 (1024 rows of a 16384-code
# vocabulary) stays near the caches; on a GPU 1 GiB: smaller chunks made batch-16 sampling 1.4x slower on an
# H200 (kernel launches), and 16 x 8192 targets would otherwise take 8 GiB of fp32 logits per copy.
LOGIT_CHUNK_ELEMENTS = {"cpu": 1 << 24, "cuda": 1 << 28}
# The context cache (E2 in Sampler) is skipped when it would take more: at 128 frames it is 7 blocks x keys and
# values x 8192 positions x 1024 channels, 470 MiB per sample (fp32), for ~2% of the time.
CONTEXT_CACHE_MAX_BYTES = 8 << 30


def _masked_after(t: float, n: int) -> int:
    # cos(pi/2) is 6e-17 in floating point, which would leave one position masked after the last step.
    return 0 if t >= 1 else math.ceil(math.cos(math.pi * t / 2) * n)


def maskgit_schedule(cfg: SamplingConfig, n: int) -> list[tuple[int, int]]:
    """(step k, positions committed at k) for the MaskGIT steps that commit anything, over n free positions.

    ``bootstrap`` positions are already committed when the schedule starts; steps whose cosine target they
    already exceed would commit nothing and are skipped (no model call), which changes nothing but time.
    """
    plan, committed = [], cfg.bootstrap
    for k in range(cfg.steps):
        goal = n - _masked_after((k + 1) / cfg.steps, n)
        if goal > committed:
            plan.append((k, goal - committed))
            committed = goal
    return plan


def num_forward_passes(cfg: SamplingConfig, n: int) -> int:
    """How many model calls ``sample`` makes to generate n free positions (N for unconditional sampling)."""
    if n < 1:
        raise ValueError(f"nothing to generate: {n} free positions")
    for key in ("n_draft", "n_revise"):
        chunks = getattr(cfg, key)
        if chunks and n % chunks:
            raise ConfigError(f"config key '{key}' ({chunks}) must divide the {n} generated positions "
                              "into equal chunks")
    if cfg.bootstrap >= n:
        raise ConfigError(f"config key 'bootstrap' ({cfg.bootstrap}) must be below the {n} generated positions")
    draft = len(maskgit_schedule(cfg, n)) if cfg.draft == "maskgit" else cfg.n_draft
    return bootstrap_pass_count(cfg) + draft + cfg.revise_rounds * cfg.n_revise


def bootstrap_pass_count(cfg: SamplingConfig) -> int:
    return cfg.bootstrap if cfg.bootstrap_passes is None else min(cfg.bootstrap_passes, cfg.bootstrap)


def sample_logits(logits: torch.Tensor, temperature: float, top_k: Optional[int] = None,
                  top_p: Optional[float] = None, generator: Optional[torch.Generator] = None):
    """Sample one code per row of logits [B, M, V]; returns codes [B, M] and their log-probabilities [B, M]
    under the distribution actually sampled from (after temperature and top-k/top-p filtering).

    Sampling is by inverse CDF (one uniform number per row and a binary search) rather than
    ``torch.multinomial``, which dominates a pass over thousands of rows of a 16384-code vocabulary; with
    top-k only the k candidates are sorted, normalized and searched.
    """
    u = torch.rand((*logits.shape[:-1], 1), generator=generator, device=logits.device)
    return _draw(logits, temperature, top_k, top_p, u)


def sample_head(head: nn.Linear, features: torch.Tensor, temperature: float, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None,
                chunk_elements: Optional[int] = None):
    """``sample_logits(head(features), ...)`` for features [B, M, d], with the same random draws, holding
    at most ``chunk_elements`` logits at a time (default: ``LOGIT_CHUNK_ELEMENTS`` of the device): [B, M, V]
    fp32 logits are 512 MiB per 8192-target sample."""
    b, m, _ = features.shape
    chunk_elements = chunk_elements or LOGIT_CHUNK_ELEMENTS.get(features.device.type, LOGIT_CHUNK_ELEMENTS["cuda"])
    u = torch.rand((b, m, 1), generator=generator, device=features.device).flatten(0, 1)
    rows = features.flatten(0, 1)
    step = max(1, chunk_elements // head.out_features)
    parts = [_draw(head(rows[s:s + step]), temperature, top_k, top_p, u[s:s + step]) for s in range(0, len(rows), step)]
    return tuple(torch.cat(drawn).view(b, m) for drawn in zip(*parts))


def _draw(logits: torch.Tensor, temperature: float, top_k: Optional[int], top_p: Optional[float],
          u: torch.Tensor):
    """``sample_logits`` with its uniform numbers ``u`` [..., 1] given."""
    logits = logits.float()
    codes = None  # candidate codes when the rows were reduced to sorted candidates
    if top_k is not None and top_k < logits.shape[-1]:
        # Before the temperature, which keeps the order: k columns to divide instead of the vocabulary.
        logits, codes = logits.topk(top_k, dim=-1)
    if temperature != 1.0:   # x / 1.0 == x: no copy of the logits to make
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        if codes is None:
            logits, codes = logits.sort(dim=-1, descending=True)
        probs = logits.softmax(dim=-1)
        # Keep the smallest prefix holding mass >= top_p: drop a code once the codes ranked above it
        # already hold top_p (the most likely code is therefore always kept).
        logits = logits.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, float("-inf"))
    logp = F.log_softmax(logits, dim=-1)
    cdf = logp.exp().cumsum(dim=-1)
    u = u * cdf[..., -1:]
    choice = torch.searchsorted(cdf, u, right=True)
    # Rounding can put u at the very top of the CDF: fall back to the last code with non-zero probability.
    choice = torch.minimum(choice, (logp > float("-inf")).sum(dim=-1, keepdim=True) - 1)
    if codes is not None:  # sorted candidates: dropped ones are last, so the clamp above stays among the kept
        return codes.gather(-1, choice).squeeze(-1), logp.gather(-1, choice).squeeze(-1)
    return choice.squeeze(-1), logp.gather(-1, choice).squeeze(-1)


def _model_device(model: nn.Module) -> torch.device:
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


class _Sampler:
    """Per-batch state (codes, known, fixed) and the three kinds of step that change it.

    With ``fast`` (a ``MeBT`` model) a pass skips work whose result is never used, drawing the same random
    numbers: (E1) the last block and the head run on the rows to commit only (``MeBT.features``), (E2) the
    contexts' keys and values are kept from pass to pass (``ContextCache``), (E3) logits are made and
    sampled a chunk of rows at a time, top-k before the temperature (``sample_head``). Without it, every
    pass computes every target's logits, as the official sampler does.
    """

    def __init__(self, model, cfg: SamplingConfig, codes, known, generator, bar, fast: bool):
        self.model, self.cfg, self.generator, self.bar = model, cfg, generator, bar
        self.fast = fast and isinstance(model, MeBT)
        fits = self.fast and ContextCache.nbytes(model.cfg, codes.shape[0]) <= CONTEXT_CACHE_MAX_BYTES
        self.cache = ContextCache() if fits else None
        self.codes = codes                  # [B, N] long; values at unknown positions are never read
        self.known = known                  # [B, N] bool: the contexts of the next pass
        self.fixed = known.clone()          # given positions: never resampled
        self.n_known = int(known[0].sum())  # the same in every sample, tracked to avoid device syncs
        self.n_free = known.shape[1] - self.n_known

    def split(self):
        """Context and target positions: every known position is a context, every unknown one a target."""
        # A stable sort of ~known lists each sample's known positions first, in grid order; since the
        # counts are equal, slicing at n_known splits every row into contexts and targets.
        order = torch.sort((~self.known).to(torch.uint8), dim=1, stable=True).indices
        return order[:, :self.n_known], order[:, self.n_known:]

    def draw(self, ctx_idx, tgt_idx, rows, temperature: float, top_k: Optional[int], top_p: Optional[float]):
        """One model call: sampled codes and their log-probabilities [B, M] for target rows ``rows`` [B, M]
        (every target when None)."""
        if self.fast:
            features = self.model(self.codes, ctx_idx, tgt_idx, rows=rows, features_only=True,
                                  context_cache=self.cache)
            drawn = sample_head(self.model.head, features, temperature, top_k, top_p, self.generator)
        else:
            logits = select_rows(self.model(self.codes, ctx_idx, tgt_idx), rows)
            drawn = sample_logits(logits, temperature, top_k, top_p, self.generator)
        self.bar.update(1)
        return drawn

    def commit(self, pos, values):
        self.codes.scatter_(1, pos, values)
        self.known.scatter_(1, pos, True)
        self.n_known += pos.shape[1]

    def random_order(self):
        """Per sample, the free (not given) positions in random order: [B, N_free]."""
        keys = torch.rand(self.codes.shape, generator=self.generator, device=self.codes.device)
        keys.masked_fill_(self.fixed, 2.0)  # given positions sort last and are cut off
        return keys.argsort(dim=1)[:, :self.n_free]

    def random_chunks(self, n_chunks: int):
        """A fresh random split of the free positions into n_chunks equal chunks: [n_chunks, B, c]."""
        return rearrange(self.random_order(), "b (k c) -> k b c", k=n_chunks)

    def fill(self, chunk, temperature: float, top_k: Optional[int], top_p: Optional[float]):
        """Sample the unknown positions ``chunk`` [B, c] in one pass and commit them."""
        ctx_idx, tgt_idx = self.split()
        # Where each grid position sits among the targets: the model computes logits for the chunk's rows only.
        slot = torch.zeros_like(self.codes)
        slot.scatter_(1, tgt_idx, torch.arange(tgt_idx.shape[1], device=slot.device).expand_as(tgt_idx))
        codes, _ = self.draw(ctx_idx, tgt_idx, slot.gather(1, chunk), temperature, top_k, top_p)
        self.commit(chunk, codes)

    def maskgit_step(self, k: int, n_new: int):
        """Sample every target, keep the n_new most confident (with Gumbel noise that anneals to zero)."""
        cfg = self.cfg
        ctx_idx, tgt_idx = self.split()
        codes, logp = self.draw(ctx_idx, tgt_idx, None, cfg.temperature, cfg.top_k, cfg.top_p)
        confidence = logp
        # The official sampler anneals with t_next = (k+1)/n, the time the commit count is taken at.
        tau = cfg.ctemp * (1 - (k + 1) / cfg.steps)
        if tau > 0:  # log p + tau * Gumbel == log(p / E^tau) with E ~ Exp(1), the official ranking
            exp_noise = torch.empty_like(logp).exponential_(generator=self.generator)
            confidence = logp - tau * exp_noise.log()
        pick = confidence.topk(n_new, dim=1).indices
        self.commit(tgt_idx.gather(1, pick), codes.gather(1, pick))

    def revise(self, chunk):
        """Forget the chunk and resample it given everything else."""
        self.known.scatter_(1, chunk, False)
        self.n_known -= chunk.shape[1]
        cfg = self.cfg
        self.fill(chunk, cfg.revise_temperature, cfg.revise_top_k, cfg.revise_top_p)


def _given_state(model, batch_size: int, given_codes, given_mask):
    """Initial codes [B, N] and known [B, N] from the optional conditioning, with its checks."""
    n, vocab = model.cfg.block_size, model.cfg.vocab_size
    if (given_codes is None) != (given_mask is None):
        raise ValueError("pass given_codes and given_mask together (codes to keep and where they are)")
    if given_codes is None:
        device = _model_device(model)
        return (torch.zeros(batch_size, n, dtype=torch.long, device=device),
                torch.zeros(batch_size, n, dtype=torch.bool, device=device))
    codes = given_codes.flatten(1).long().clone()
    if codes.shape != (batch_size, n):
        raise ValueError(f"given_codes must be [batch_size, N] = [{batch_size}, {n}], got {list(given_codes.shape)}")
    if given_mask.dtype != torch.bool:
        raise ValueError(f"given_mask must be a bool tensor, got {given_mask.dtype}")
    known = given_mask.to(codes.device)
    known = known if known.dim() == 1 else known.flatten(1)  # [N] is shared by the whole batch
    if known.shape[-1] != n or known.dim() == 2 and known.shape[0] != batch_size:
        raise ValueError(f"given_mask must be [N] or [batch_size, N] with N = {n}, got {list(given_mask.shape)}")
    known = known.expand(batch_size, n).clone()
    counts = known.sum(dim=1)
    if (counts != counts[0]).any():
        raise ValueError(f"given_mask must mark the same number of positions in every sample, got "
                         f"{sorted(set(counts.tolist()))}: batched passes need equal context counts")
    given = codes[known]
    if given.numel() and (given.min() < 0 or given.max() >= vocab):
        raise ValueError(f"given_codes at given positions must be in [0, {vocab}), "
                         f"got values in [{int(given.min())}, {int(given.max())}]")
    codes.masked_fill_(~known, 0)
    return codes, known


@torch.no_grad()
def sample(model: nn.Module, cfg: SamplingConfig, batch_size: int, *, given_codes: Optional[torch.Tensor] = None,
           given_mask: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
           progress: bool = False, desc: str = "sampling", leave: bool = True, fast: bool = True) -> torch.Tensor:
    """Generate ``batch_size`` code grids [B, N] (long) with ``model(codes, ctx_idx, tgt_idx, rows) -> logits``.

    given_codes [B, N] and given_mask [B, N] or [N] (bool) fix some positions (e.g. the first frames); they
    are returned unchanged. All randomness comes from ``generator`` (on the codes' device) when given.
    ``progress`` shows a bar of forward passes named ``desc`` (kept when done if ``leave``). ``fast`` skips
    work whose result is never used (``_Sampler``; the same codes), False runs every pass in full, as the
    official sampler does (benchmarks compare the two).
    """
    codes, known = _given_state(model, batch_size, given_codes, given_mask)
    n_free = codes.shape[1] - int(known[0].sum())
    total = num_forward_passes(cfg, n_free)
    with tqdm(total=total, disable=not progress, desc=desc, unit="pass", leave=leave) as bar:
        state = _Sampler(model, cfg, codes, known, generator, bar, fast)
        if cfg.draft == "maskgit":
            if cfg.bootstrap:  # single random positions, one per pass, so the schedule starts from some context
                order = state.random_order()[:, :cfg.bootstrap]
                for pos in order.tensor_split(bootstrap_pass_count(cfg), dim=1):
                    state.fill(pos, cfg.bootstrap_temperature, cfg.bootstrap_top_k, cfg.bootstrap_top_p)
            for k, n_new in maskgit_schedule(cfg, n_free):
                state.maskgit_step(k, n_new)
        else:
            for chunk in state.random_chunks(cfg.n_draft):
                state.fill(chunk, cfg.temperature, cfg.top_k, cfg.top_p)
        for _ in range(cfg.revise_rounds):
            for chunk in state.random_chunks(cfg.n_revise):
                state.revise(chunk)
    return state.codes
