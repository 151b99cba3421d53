"""FLOPs of a MeBT forward/training step and the accelerator's peak, for throughput and MFU logging.

Counts are matrix-multiply FLOPs at 2*m*n*k per [m, k] x [k, n] product, the convention of
``torch.utils.flop_counter`` and of MFU papers (PaLM, nanoGPT). Embedding lookups, LayerNorm, softmax,
GELU, residual adds and biases are not counted: they are O(n*d) against the O(n*d^2) of the matmuls.
"""
from __future__ import annotations

import os
import re

import torch

from mebt.core.model import MeBTConfig
from mebt.errors import UserError


def block_flops(d: int, n_q: int, n_kv: int) -> int:
    """One Block with ``n_q`` query rows attending over ``n_kv`` key/value rows, embedding width ``d``."""
    linear = 2 * d * d * (2 * n_q + 2 * n_kv)   # query and proj on the queries, key and value on the keys
    mlp = 2 * 2 * n_q * d * 4 * d               # d -> 4d -> d on the queries
    attention = 2 * 2 * n_q * n_kv * d          # scores q.k^T and weights @ v, summed over the heads
    return linear + mlp + attention


def mebt_forward_flops(cfg: MeBTConfig, n_ctx: int, n_tgt: int) -> int:
    """Matmul FLOPs of one sample's forward with ``n_ctx`` context and ``n_tgt`` target tokens.

    Follows ``MeBT.features``: latent_enc (latents read the contexts), latent_self (latents x latents),
    latent_dec (targets read the latents), lt2l (latents read [latents; targets]), then the head on every
    target. With no contexts a latent_enc block costs only its query side (the model skips attention).
    """
    if n_ctx < 0 or n_tgt < 0:
        raise ValueError(f"token counts must be non-negative, got n_ctx={n_ctx}, n_tgt={n_tgt}")
    d, n_lat = cfg.n_embd, cfg.n_latent
    kv_rows = {"latent_enc": (n_lat, n_ctx), "latent_self": (n_lat, n_lat),
               "latent_dec": (n_tgt, n_lat), "lt2l": (n_lat, n_lat + n_tgt)}
    blocks = sum(block_flops(d, *kv_rows[kind]) for kind in cfg.plan)
    head = 2 * n_tgt * d * cfg.vocab_size
    return blocks + head


def mebt_train_flops(cfg: MeBTConfig, n_ctx: int, n_tgt: int) -> int:
    """Forward + backward of one sample: 3x the forward (backward computes input and weight gradients).

    Recomputation by ``grad_checkpoint`` is deliberately not counted, so MFU measures useful work only
    (checkpointing then shows up as lower MFU, as in the PaLM convention).
    """
    return 3 * mebt_forward_flops(cfg, n_ctx, n_tgt)


# Dense peak TFLOP/s (vendor datasheet, dense: the "with sparsity" figures halved). Checked in order, so
# the specific names come before the generic ones; a regex, because "A10" is a prefix of "A100" and "L4"
# of "L40S". fp32 means IEEE fp32 on CUDA cores; tf32 is used for float32 when torch allows TF32 matmuls.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    (r"H100.*PCIe", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.0}),
    (r"H100.*NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"H100", {"bf16": 989.5, "fp16": 989.5, "tf32": 494.5, "fp32": 67.0}),   # SXM
    (r"H200.*NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"H200", {"bf16": 989.5, "fp16": 989.5, "tf32": 494.5, "fp32": 67.0}),   # SXM
    (r"A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"A10\b", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (r"L4\b", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (r"V100.*PCIE", {"fp16": 112.0, "fp32": 14.0}),                           # no bf16 or tf32 units
    (r"V100", {"fp16": 125.0, "fp32": 15.7}),                                 # SXM2
]
# Not listed: AWS's A10G (no NVIDIA datasheet; it is not an A10 at tensor throughput). Unknown cards get
# no MFU rather than a wrong one; set MEBT_PEAK_FLOPS for them.


def _dtype_key(dtype: torch.dtype) -> str | None:
    if dtype == torch.float32:
        # TF32 tensor cores are used for float32 matmuls unless the precision is "highest".
        return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype)


def peak_for_name(name: str, dtype: torch.dtype) -> float | None:
    """Dense peak FLOP/s of the card called ``name`` (as torch.cuda.get_device_name says) for ``dtype``."""
    key = _dtype_key(dtype)
    for pattern, peaks in PEAK_TFLOPS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            tflops = peaks.get(key)
            if tflops is None and key == "tf32":
                tflops = peaks.get("fp32")  # no TF32 units: float32 runs at the fp32 rate
            return None if tflops is None else tflops * 1e12
    return None


def peak_flops_per_s(device: torch.device | str, dtype: torch.dtype) -> float | None:
    """Dense peak FLOP/s of ``device`` for ``dtype`` matmuls; None for CPUs and unknown cards.

    The environment variable MEBT_PEAK_FLOPS (FLOP/s, e.g. 989e12) takes precedence over the table.
    """
    override = os.environ.get("MEBT_PEAK_FLOPS", "").strip()
    if override:
        try:
            value = float(override)
        except ValueError:
            value = float("nan")
        if not value > 0 or value == float("inf"):
            raise UserError(f"MEBT_PEAK_FLOPS must be a positive number of FLOP/s (e.g. 989e12), got '{override}'")
        return value
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_for_name(torch.cuda.get_device_name(device), dtype)


def mfu(flops_per_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilization: achieved / peak FLOP/s, or None when the peak is unknown."""
    if peak is None or peak <= 0:
        return None
    return flops_per_s / peak
