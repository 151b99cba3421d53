"""Convert a released MeBT checkpoint (the official Lightning ``Net2NetTransformer``) to a mebt model file.

The official layout (see ``shared/reference/mebt_official_16f_state_dict.tsv``) maps one to one onto
``mebt.model.MeBT``: the transformer lives under ``transformer.``, the latent array is called
``sos_emb`` and the three embedding parameters carry leading batch dimensions of size 1. The frozen
VQGAN under ``first_stage_model.`` is the tokenizer, loaded separately, and is dropped; any other key
is an error, so a checkpoint of a different model cannot be half-converted without notice.

The checkpoint does not record the head count or the code grid, so ``n_head`` (default 16, as in every
published config) and ``latent_shape`` (default ``(block_size // 256, 16, 16)``: 128x128 frames give
16x16 codes) are parameters.
"""
from __future__ import annotations

import logging
import math
import re
import zipfile
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

from mebt.checkpoint import (CheckpointError, check_state_dict, expected_shapes, load_user_file,
                             model_from_state_dict, save_model)
from mebt.model import MeBTConfig, paper_layer_plan

log = logging.getLogger(__name__)

# The frozen tokenizer saved inside every official transformer checkpoint (its cond_stage_model, an
# SOSProvider, has no parameters, so it never appears).
IGNORED_PREFIXES = ("first_stage_model.",)
_RENAMED = {"latents": "sos_emb"}
# Official code stores these as [1, 1, d], [1, N_L, d] and [1, N, d] to broadcast over the batch.
_BATCHED = ("mask_emb", "latents", "pos_emb")
_TRANSFORMER_PARTS = ("blocks.", "ln_f.", "head.")
_BLOCK_KEY = re.compile(r"^transformer\.blocks\.(\d+)\.")
_WHAT = "official checkpoint"
_HINT = " (is this an official MeBT transformer checkpoint?)"


def official_key(key: str) -> str:
    """The official checkpoint's name for this project's parameter ``key``."""
    key = _RENAMED.get(key, key)
    return "transformer." + key if key.startswith(_TRANSFORMER_PARTS) else key


def official_shape(key: str, shape: Sequence[int]) -> tuple:
    """The official checkpoint's shape for this project's parameter ``key`` of shape ``shape``."""
    shape = tuple(shape)
    return (1,) * (3 - len(shape)) + shape if key in _BATCHED else shape


def _shape(sd: Mapping, key: str, ndim: int, meaning: str) -> tuple:
    if key not in sd:
        raise CheckpointError(f"{_WHAT} is missing key '{key}'{_HINT}")
    shape = tuple(getattr(sd[key], "shape", ()))
    if len(shape) != ndim:
        raise CheckpointError(f"{_WHAT} key '{key}' has shape {list(shape)}, expected {meaning}")
    return shape


def infer_config(sd: Mapping, n_head: int = 16, latent_shape: Optional[Sequence[int]] = None,
                 layer_plan: Optional[Sequence[str]] = None, numerics: str = "official") -> MeBTConfig:
    """MeBTConfig read off the shapes of an official state dict (transformer keys only)."""
    vocab_size, n_embd = _shape(sd, "tok_emb.weight", 2, "[vocab_size, n_embd]")
    n_latent = _shape(sd, "sos_emb", 3, "[1, n_latent, n_embd]")[1]
    block_size = _shape(sd, "pos_emb", 3, "[1, block_size, n_embd]")[1]
    blocks = {int(m.group(1)) for k in sd if (m := _BLOCK_KEY.match(k))}
    if not blocks:
        raise CheckpointError(f"{_WHAT} has no 'transformer.blocks.*' keys{_HINT}")
    # A gap in the numbering shows up later as missing keys of the absent block.
    n_layer = max(blocks) + 1
    if latent_shape is None:
        if block_size % 256:
            raise CheckpointError(f"{_WHAT} has block_size {block_size}, not a multiple of 16x16 codes: "
                                  "pass latent_shape (T, H, W) with T*H*W = block_size")
        latent_shape = (block_size // 256, 16, 16)
    latent_shape = tuple(latent_shape)
    if math.prod(latent_shape) != block_size:
        raise CheckpointError(f"latent_shape {list(latent_shape)} has {math.prod(latent_shape)} positions but the "
                              f"{_WHAT}'s pos_emb has block_size {block_size}")
    # An explicit plan makes the converted file self-describing, independent of later default changes.
    plan = list(layer_plan) if layer_plan is not None else paper_layer_plan(n_layer)
    return MeBTConfig(vocab_size=vocab_size, latent_shape=latent_shape, block_size=block_size, n_layer=n_layer,
                      layer_plan=plan, n_embd=n_embd, n_head=n_head, n_latent=n_latent, numerics=numerics)


def convert_official_state_dict(sd: Mapping, n_head: int = 16, latent_shape: Optional[Sequence[int]] = None,
                                layer_plan: Optional[Sequence[str]] = None,
                                numerics: str = "official") -> tuple[MeBTConfig, dict]:
    """(config, state dict for ``MeBT(config)``) from an official MeBT state dict.

    Strict: every missing, unexpected or wrongly shaped key is reported in one ``CheckpointError`` line;
    only ``first_stage_model.*`` (the VQGAN) is dropped. Keep ``numerics="official"`` to reproduce the
    released model; "preln" changes the function the weights compute.
    """
    transformer_sd = {k: v for k, v in sd.items() if not k.startswith(IGNORED_PREFIXES)}
    cfg = infer_config(transformer_sd, n_head, latent_shape, layer_plan, numerics)
    ours = expected_shapes(cfg)
    check_state_dict(transformer_sd, {official_key(k): official_shape(k, s) for k, s in ours.items()}, _WHAT, _HINT)
    # float(): the project keeps fp32 master weights whatever precision the checkpoint was saved in.
    return cfg, {k: transformer_sd[official_key(k)].reshape(s).float() for k, s in ours.items()}


def read_official_state_dict(ckpt_path: str | Path) -> dict:
    """The state dict of an official checkpoint (Lightning ``ckpt['state_dict']`` or a bare state dict).

    Tried first with ``weights_only=True``. Official Lightning checkpoints also pickle their
    hyper-parameters (argparse/OmegaConf objects), which that refuses; then the file is loaded with
    ``weights_only=False``, which can run code stored in it. That is done only for this file, which the
    user named explicitly, and is logged; never point it at a checkpoint you do not trust.
    Memory-mapping keeps the optimizer states and the VQGAN on disk instead of in memory.
    """
    path = Path(ckpt_path)
    if not path.is_file():
        raise CheckpointError(f"official MeBT checkpoint '{path}' does not exist; download it from the MeBT "
                              "release and pass its path")
    mmap = zipfile.is_zipfile(path)  # files in the legacy (pre-torch-1.6) format cannot be memory-mapped
    ckpt = load_user_file(path, f"official MeBT checkpoint '{path}'", mmap=mmap)
    if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict):
        return ckpt["state_dict"]
    if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt
    top = _top_level(ckpt)
    raise CheckpointError(f"official MeBT checkpoint '{path}' holds neither a Lightning 'state_dict' nor a bare "
                          f"state dict ({top})")


def _top_level(obj) -> str:
    if not isinstance(obj, dict):
        return f"it holds a {type(obj).__name__}"
    keys = [str(k) for k in obj][:8]
    return "top-level keys: " + (", ".join(keys) or "none") + (" ..." if len(obj) > 8 else "")


def convert_official_file(ckpt_path: str | Path, out_path: str | Path, n_head: int = 16,
                          latent_shape: Optional[Sequence[int]] = None,
                          layer_plan: Optional[Sequence[str]] = None) -> MeBTConfig:
    """Convert the official checkpoint at ``ckpt_path`` into a mebt model file at ``out_path``.

    The file is read with ``weights_only=True`` first; official Lightning checkpoints pickle their
    hyper-parameters, so they are then read with ``weights_only=False`` (which can run code stored in
    the file). That fallback applies only to this file, which the caller named: use trusted files only.
    The output is written under a temporary name and renamed (``save_model``); returns its config.
    """
    cfg, sd = convert_official_state_dict(read_official_state_dict(ckpt_path), n_head, latent_shape, layer_plan)
    model = model_from_state_dict(cfg, sd, _WHAT)
    save_model(model, out_path, extra={"source": f"official MeBT checkpoint {Path(ckpt_path).name}"})
    return cfg
