"""MeBT: Memory-efficient Bidirectional Transformer (Yoo et al., CVPR 2023) in one file.

A video is a T' x H' x W' grid of VQGAN codes, flattened to N positions. Some positions are observed
("contexts"), the rest are to be predicted ("targets"). Instead of full N x N attention, a fixed set of
N_L learned latent tokens reads the contexts (``latent_enc``), thinks (``latent_self``), and the targets
read the latents (``latent_dec``) while the latents also read the targets (``lt2l``). Every attention has
one side of size N_L, so the cost is linear in N.

Two numerics: ``official`` reproduces the released checkpoints (one LayerNorm shared by query and key,
residual added to the *normalized* query); ``preln`` is the standard pre-LN residual.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from mebt.errors import ConfigError

LAYER_KINDS = ("latent_enc", "latent_self", "latent_dec", "lt2l")


def paper_layer_plan(n_layer: int) -> list[str]:
    """The paper's plan scaled to ``n_layer``: [enc, self] x a, enc, [dec, lt2l] x b, dec.

    24 layers give a=6, b=5, exactly the published stack; the encoder side gets the extra pair when odd.
    """
    if n_layer < 2 or n_layer % 2:
        raise ConfigError(f"config key 'n_layer' must be an even number >= 2 for the paper's plan, got {n_layer} "
                          "(or give an explicit layer_plan)")
    pairs = n_layer // 2 - 1
    a = (pairs + 1) // 2
    b = pairs - a
    return ["latent_enc", "latent_self"] * a + ["latent_enc"] + ["latent_dec", "lt2l"] * b + ["latent_dec"]


@dataclass
class MeBTConfig:
    vocab_size: int = 16384                             # tokenizer codebook size
    latent_shape: tuple[int, int, int] = (4, 16, 16)    # T' x H' x W' code grid (16 frames of 128x128)
    block_size: Optional[int] = None                    # flattened grid size; derived when omitted
    n_layer: int = 24
    layer_plan: Optional[list[str]] = None              # explicit block kinds; default: paper_layer_plan
    n_embd: int = 1024
    n_head: int = 16
    n_latent: int = 256
    dropout: float = 0.0
    numerics: Literal["official", "preln"] = "official"
    # Recompute each block in backward. "auto": `mebt train` turns it on only when the planner's memory
    # estimate needs it (mebt.train.plan); a model built directly treats "auto" as off.
    grad_checkpoint: bool | Literal["auto"] = False

    def __post_init__(self):
        for key in ("vocab_size", "n_layer", "n_embd", "n_head", "n_latent"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key '{key}' must be positive, got {getattr(self, key)}")
        if any(s < 1 for s in self.latent_shape):
            raise ConfigError(f"config key 'latent_shape' must be positive sizes, got {list(self.latent_shape)}")
        n = math.prod(self.latent_shape)
        if self.block_size is None:
            self.block_size = n
        elif self.block_size != n:
            raise ConfigError(f"config key 'block_size' ({self.block_size}) does not match latent_shape "
                              f"{list(self.latent_shape)} = {n} positions: set block_size={n} or omit it")
        if self.n_embd % self.n_head:
            raise ConfigError(f"config key 'n_head' ({self.n_head}) must divide n_embd ({self.n_embd})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"config key 'dropout' must be in [0, 1), got {self.dropout}")
        if self.layer_plan is not None:
            bad = [k for k in self.layer_plan if k not in LAYER_KINDS]
            if bad:
                raise ConfigError(f"config key 'layer_plan' has unknown block kind '{bad[0]}' "
                                  f"(known: {', '.join(LAYER_KINDS)})")
            if len(self.layer_plan) != self.n_layer:
                raise ConfigError(f"config key 'n_layer' ({self.n_layer}) does not match layer_plan's "
                                  f"{len(self.layer_plan)} blocks: set n_layer={len(self.layer_plan)}")
            if self.layer_plan[-1] != "latent_dec":
                raise ConfigError("config key 'layer_plan' must end with latent_dec: only target updates reach the logits")
        self.plan  # validates the derived plan too

    @property
    def plan(self) -> list[str]:
        return list(self.layer_plan) if self.layer_plan is not None else paper_layer_plan(self.n_layer)


class Attention(nn.Module):
    """Multi-head attention of queries ``x`` over a key/value sequence ``kv`` (bias-free scores, no mask)."""

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0):
        super().__init__()
        self.query = nn.Linear(n_embd, n_embd)
        self.key = nn.Linear(n_embd, n_embd)
        self.value = nn.Linear(n_embd, n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.n_head = n_head
        self.dropout = dropout
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x, kv, causal: bool = False, cache=None, kv_proj=None):
        """``kv_proj``: the key and value projections of ``kv``, computed earlier (``ContextCache``)."""
        heads = lambda t: rearrange(t, "b n (h d) -> b h n d", h=self.n_head)
        k, v = kv_proj if kv_proj is not None else (self.key(kv), self.value(kv))
        q, k, v = heads(self.query(x)), heads(k), heads(v)
        if cache is not None:  # autoregressive decoding: append this step's keys/values, attend to all so far
            k, v = cache.update(k, v)
        if k.shape[2] == 0:
            # No observed tokens (first sampling step, or a fully masked training sample): an empty attention
            # sum is zero, as in the official einsum implementation; SDPA would return NaN here. Written as
            # q*0 + (k, v sums)*0 so every projection still gets a (zero) gradient: ZeRO reduces gradient
            # buckets by layout, and a rank whose q/k/v had none would mismatch the other ranks.
            y = q * 0.0 + (k.sum() + v.sum()) * 0.0
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                               dropout_p=self.dropout if self.training else 0.0)
        return self.resid_drop(self.proj(rearrange(y, "b h n d -> b n (h d)")))


class Block(nn.Module):
    """x = q + Attn(LN(q), LN(kv)); x = x + MLP(LN2(x)). Self-attention when ``kv`` is None."""

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, official: bool = False):
        super().__init__()
        self.official = official
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = Attention(n_embd, n_head, dropout)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd),
                                 nn.Dropout(dropout))

    def forward(self, x, kv=None, causal: bool = False, cache=None, kv_proj=None):
        xn = self.ln1(x)
        kvn = xn if kv is None else self.ln1(kv)   # unused when kv_proj is given (pass kv=None then)
        # The official block adds attention to the normalized query; released checkpoints depend on it.
        x = (xn if self.official else x) + self.attn(xn, kvn, causal, cache, kv_proj)
        return x + self.mlp(self.ln2(x))

    def kv_proj(self, kv):
        """The key and value projections this block's attention makes of a key/value input."""
        kvn = self.ln1(kv)
        return self.attn.key(kvn), self.attn.value(kvn)


def init_weights(module: nn.Module) -> None:
    """N(0, 0.02) for linear and embedding weights, zero biases (the GPT/MeBT convention)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


def select_rows(x: torch.Tensor, rows: Optional[torch.Tensor]) -> torch.Tensor:
    """x[b, rows[b]] for x [B, M, d] and rows [B, K]; x itself when rows is None."""
    return x if rows is None else x.gather(1, rows.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class ContextCache:
    """The keys and values every ``latent_enc`` block makes of the contexts, kept across sampling passes.

    A context enters ``latent_enc`` as ``tok_emb[code] + pos_emb[position]``, whatever else is known, so
    its LayerNorm and key/value projections are the same in every pass that sees it: they are computed
    once per (position, code) and gathered after that. A position whose code changed (a revision pass
    resampled it) is computed again. For inference only (no dropout); one cache per batch of grids.
    """

    def __init__(self):
        self.code: Optional[torch.Tensor] = None   # [B, N]: the code each position's entries hold (-1: none)
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # block index -> keys, values [B, N, d]

    def update(self, model: "MeBT", codes: torch.Tensor, ctx_idx: torch.Tensor) -> None:
        """Compute the entries of the contexts ``ctx_idx`` [B, N_ctx] that are missing or out of date."""
        if self.code is None or self.code.shape != codes.shape:
            self.code = torch.full_like(codes, -1)
            like, device = model.pos_emb, model.pos_emb.device.type
            # Under autocast the projections come out in its dtype: kept as they are, attention reads the same.
            dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else like.dtype
            self.kv = {i: tuple(like.new_empty(*codes.shape, like.shape[-1], dtype=dtype) for _ in "kv")
                       for i, kind in enumerate(model.kinds) if kind == "latent_enc"}
        now = codes.gather(1, ctx_idx)
        b, c = (self.code.gather(1, ctx_idx) != now).nonzero(as_tuple=True)   # ragged: flat (sample, slot) pairs
        if not len(b):
            return
        pos = ctx_idx[b, c]
        emb = model.tok_emb(now[b, c]) + model.pos_emb[pos]
        for i, kind in enumerate(model.kinds):
            if kind == "latent_enc":
                self.kv[i][0][b, pos], self.kv[i][1][b, pos] = model.blocks[i].kv_proj(emb)
        self.code[b, pos] = now[b, c]

    def get(self, i: int, ctx_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(select_rows(t, ctx_idx) for t in self.kv[i])

    @staticmethod
    def nbytes(cfg: "MeBTConfig", batch_size: int, itemsize: int = 4) -> int:
        """Memory the cache takes once every position has entries."""
        return cfg.plan.count("latent_enc") * 2 * batch_size * cfg.block_size * cfg.n_embd * itemsize


class MeBT(nn.Module):
    def __init__(self, cfg: MeBTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.n_embd
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.mask_emb = nn.Parameter(torch.randn(d) * 0.02)           # what a target position looks like
        self.pos_emb = nn.Parameter(torch.randn(cfg.block_size, d) * 0.02)
        self.latents = nn.Parameter(torch.randn(cfg.n_latent, d) * 0.02)  # the N_L latent tokens
        self.drop = nn.Dropout(cfg.dropout)
        self.kinds = cfg.plan
        official = cfg.numerics == "official"
        self.blocks = nn.ModuleList(Block(d, cfg.n_head, cfg.dropout, official) for _ in self.kinds)
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, cfg.vocab_size, bias=False)
        self.apply(init_weights)

    def _block(self, i: int, x, kv):
        if self.cfg.grad_checkpoint is True and self.training and torch.is_grad_enabled():
            return checkpoint(self.blocks[i], x, kv, use_reentrant=False)
        return self.blocks[i](x, kv)

    def features(self, codes: torch.Tensor, ctx_idx: torch.Tensor, tgt_idx: torch.Tensor,
                 rows: Optional[torch.Tensor] = None, context_cache: Optional[ContextCache] = None) -> torch.Tensor:
        """Final normalized target states [B, N_tgt, n_embd] (the head's input), or [B, K, n_embd] for the
        target rows ``rows`` [B, K] only.

        codes: [B, N] (or [B, T', H', W']) long; ctx_idx: [B, N_ctx] and tgt_idx: [B, N_tgt] long positions in
        the flattened grid, the same counts for every sample. Codes at target positions are never read, so
        the answer cannot leak into the input. ``context_cache`` (inference) keeps the contexts' keys and
        values from one call to the next.
        """
        codes = codes.flatten(1)
        if context_cache is None:
            ctx = self.drop(self.tok_emb(codes.gather(1, ctx_idx)) + self.pos_emb[ctx_idx])
        else:
            context_cache.update(self, codes, ctx_idx)
        tgt = self.drop(self.mask_emb + self.pos_emb[tgt_idx])
        # The official embedding dropout covers the latents too (each sample gets its own mask); identity in eval.
        lat = self.drop(self.latents.expand(codes.shape[0], -1, -1))
        last = len(self.kinds) - 1
        for i, kind in enumerate(self.kinds):
            if kind == "latent_enc":
                lat = (self._block(i, lat, ctx) if context_cache is None
                       else self.blocks[i](lat, kv_proj=context_cache.get(i, ctx_idx)))
            elif kind == "latent_self":
                lat = self._block(i, lat, None)
            elif kind == "latent_dec":
                if i == last:
                    # The last block acts on each target alone and nothing after it reads other targets: the
                    # rows whose logits are wanted are all it needs (a sampler committing a few positions).
                    tgt = select_rows(tgt, rows)
                tgt = self._block(i, tgt, lat)
            else:  # lt2l: latents read their own state and the current targets
                lat = self._block(i, lat, torch.cat([lat, tgt], dim=1))
        return self.ln_f(tgt)

    def forward(self, codes: torch.Tensor, ctx_idx: torch.Tensor, tgt_idx: torch.Tensor,
                rows: Optional[torch.Tensor] = None, features_only: bool = False,
                context_cache: Optional[ContextCache] = None) -> torch.Tensor:
        """Logits [B, N_tgt, vocab] for the targets, or [B, K, vocab] for target rows ``rows`` [B, K] only.

        Every unmasked position is still a target (the latents read the targets in ``lt2l``), but a sampler
        that commits a few positions needs only their logits: the last block and the head (the largest
        single matmul) run on those rows only. ``features_only`` returns ``features()`` through this call,
        so that wrappers which act on module calls (ZeRO-3 gathers a module's parameters when it is called)
        see the embeddings being used.
        """
        features = self.features(codes, ctx_idx, tgt_idx, rows, context_cache)
        return features if features_only else self.head(features)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
