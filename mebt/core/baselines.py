"""Baselines that MeBT is compared against, built from the same blocks and configuration.

``FullAttentionTransformer`` is a MaskGIT-style bidirectional transformer: it has MeBT's interface
(codes, context positions, target positions -> target logits), so the same objective and samplers drive
it, but every grid position attends to every other one (cost N^2). ``AutoregressiveTransformer`` is a
TATS-style causal GPT over the flattened grid that decodes one code per forward step with a KV cache.
Both are always pre-LN; ``n_latent`` and ``layer_plan`` of the config are unused.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mebt.core.model import Block, MeBTConfig, init_weights, select_rows
from mebt.core.sampling import sample_logits  # the same token sampler as MeBT's, for a like-for-like comparison


class _Backbone(nn.Module):
    """Token and position embeddings, a stack of pre-LN self-attention blocks, final LN and bias-free head."""

    def __init__(self, cfg: MeBTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.n_embd
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.pos_emb = nn.Parameter(torch.randn(cfg.block_size, d) * 0.02)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(d, cfg.n_head, cfg.dropout) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, cfg.vocab_size, bias=False)

    def _blocks(self, x: torch.Tensor, causal: bool, caches=None) -> torch.Tensor:
        recompute = self.cfg.grad_checkpoint is True and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if recompute:
                x = checkpoint(block, x, None, causal, use_reentrant=False)
            else:
                x = block(x, causal=causal, cache=None if caches is None else caches[i])
        return x


class FullAttentionTransformer(_Backbone):
    """Bidirectional transformer over all N grid positions; a drop-in replacement for ``MeBT``."""

    def __init__(self, cfg: MeBTConfig):
        super().__init__(cfg)
        self.mask_emb = nn.Parameter(torch.randn(cfg.n_embd) * 0.02)
        self.apply(init_weights)

    def features(self, codes: torch.Tensor, ctx_idx: torch.Tensor, tgt_idx: torch.Tensor) -> torch.Tensor:
        """Final normalized target states [B, N_tgt, n_embd]; same contract as ``MeBT.features``."""
        codes = codes.flatten(1)
        b, d = codes.shape[0], self.cfg.n_embd
        # Every position starts masked; observed ones are overwritten with their code embedding. Only
        # codes gathered at ctx_idx are embedded, so a target's code cannot reach the input.
        x = (self.mask_emb + self.pos_emb).expand(b, -1, -1)
        ctx = self.tok_emb(codes.gather(1, ctx_idx)) + self.pos_emb[ctx_idx]
        x = x.scatter(1, ctx_idx.unsqueeze(-1).expand(-1, -1, d), ctx)
        x = self._blocks(self.drop(x), causal=False)
        return self.ln_f(select_rows(x, tgt_idx))  # only the targets need the final LN and the head

    def forward(self, codes: torch.Tensor, ctx_idx: torch.Tensor, tgt_idx: torch.Tensor,
                rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits for the targets (or target rows ``rows``); same contract as ``MeBT.forward``."""
        return self.head(select_rows(self.features(codes, ctx_idx, tgt_idx), rows))


class KVCache:
    """Keys and values of one attention layer, written into [B, h, N, d] buffers allocated once.

    The buffers are created on the first ``update`` so that they take the dtype the layer actually
    produces (bf16 under autocast, fp32 otherwise).
    """

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.length = 0
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None:
            b, h, _, d = k.shape
            self.k = k.new_empty(b, h, self.max_len, d)
            self.v = v.new_empty(b, h, self.max_len, d)
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, cannot append up to {end}")
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class AutoregressiveTransformer(_Backbone):
    """Causal GPT over the flattened grid; input i is a start token (i = 0) or code i-1, logit i predicts code i."""

    def __init__(self, cfg: MeBTConfig):
        super().__init__(cfg)
        self.sos = nn.Parameter(torch.randn(cfg.n_embd) * 0.02)
        self.apply(init_weights)

    def _embed(self, codes: torch.Tensor, start: int, with_sos: bool) -> torch.Tensor:
        """Inputs at positions start, start+1, ...: the start token (if ``with_sos``) followed by ``codes``."""
        x = self.tok_emb(codes)
        if with_sos:
            x = torch.cat([self.sos.expand(x.shape[0], 1, -1), x], dim=1)
        return self.drop(x + self.pos_emb[start:start + x.shape[1]])

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """Logits [B, N, vocab]; logit i depends only on codes < i."""
        codes = codes.flatten(1)
        x = self._blocks(self._embed(codes[:, :-1], 0, with_sos=True), causal=True)
        return self.head(self.ln_f(x))

    def loss(self, codes: torch.Tensor) -> torch.Tensor:
        """Mean next-code cross-entropy over all positions."""
        codes = codes.flatten(1)
        return F.cross_entropy(self(codes).flatten(0, 1).float(), codes.flatten())

    @torch.no_grad()
    def generate(self, batch_size: int, temperature: float = 1.0, top_k: Optional[int] = None,
                 prefix: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                 return_logits: bool = False):
        """Sample [B, N] codes, one per forward step, reusing cached keys/values of earlier positions.

        ``prefix`` [B, P] codes (conditioning frames) are kept and prefilled in one causal pass. With
        ``return_logits`` also returns the [B, N, vocab] logits that produced every position.
        """
        n = self.cfg.block_size
        device = self.pos_emb.device
        if prefix is None:
            prefix = torch.empty(batch_size, 0, dtype=torch.long, device=device)
        prefix = prefix.flatten(1).to(device)
        if prefix.shape[0] != batch_size or prefix.shape[1] > n:
            raise ValueError(f"prefix must be [{batch_size}, <= {n}] codes, got {list(prefix.shape)}")
        codes = torch.empty(batch_size, n, dtype=torch.long, device=device)
        p = prefix.shape[1]
        codes[:, :p] = prefix
        if p == n:
            return (codes, self(codes)) if return_logits else codes
        caches = [KVCache(n) for _ in self.blocks]
        # Prefill: start token + prefix in one causal pass; its last logit predicts code p.
        x = self._blocks(self._embed(prefix, 0, with_sos=True), causal=True, caches=caches)
        step_logits = self.head(self.ln_f(x))
        all_logits = [step_logits] if return_logits else []
        for i in range(p, n):
            codes[:, i] = sample_logits(step_logits[:, -1:], temperature, top_k, generator=generator)[0][:, 0]
            if i + 1 == n:
                break
            # One new query attends to every cached position, so no causal mask is needed.
            x = self._blocks(self._embed(codes[:, i:i + 1], i + 1, with_sos=False), causal=False, caches=caches)
            step_logits = self.head(self.ln_f(x))
            if return_logits:
                all_logits.append(step_logits)
        return (codes, torch.cat(all_logits, dim=1)) if return_logits else codes

    @torch.no_grad()
    def generate_sliding(self, batch_size: int, frames: int, temperature: float = 1.0, top_k: Optional[int] = None,
                         generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """[B, frames x H' x W'] codes for a video longer than the model's window of T' latent frames (TATS's
        long-video sampling): the first window as ``generate``, then one latent frame at a time, each
        generated after a prefill of the T'-1 frames before it (the window's positions start over each time).
        """
        window, per_frame = self.cfg.latent_shape[0], self.cfg.block_size // self.cfg.latent_shape[0]
        if frames < window:
            raise ValueError(f"frames ({frames}) must be at least the model's window of {window} latent frames")
        codes = self.generate(batch_size, temperature, top_k, generator=generator)
        parts = [codes]
        for _ in range(frames - window):
            codes = self.generate(batch_size, temperature, top_k, prefix=codes[:, per_frame:], generator=generator)
            parts.append(codes[:, -per_frame:])
        return torch.cat(parts, dim=1)

