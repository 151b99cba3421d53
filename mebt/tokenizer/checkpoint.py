"""Loading and saving tokenizers: TATS VQGAN Lightning checkpoints and this project's own tokenizer files.

Both are ``{"state_dict": ..., "hyper_parameters": {"args": ...}}``. In a TATS file ``args`` is the
training ``argparse.Namespace``; this project writes a plain dict instead (plus ``"format"``), so its files
load with ``torch.load(weights_only=True)``. The model is rebuilt from the stored hyperparameters and
loaded strictly: the discriminators and the LPIPS network a TATS file carries are dropped, anything else
that does not match is one ``TokenizerError`` line naming the keys.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from mebt.config import from_dict, to_dict
from mebt.core.model_file import CheckpointError, atomic_save, check_state_dict, load_user_file
from mebt.errors import ConfigError, UserError
from mebt.fsutil import file_sha256
from mebt.tokenizer.vqgan import VQGAN, VQGANConfig

FORMAT = "mebt-tokenizer-v1"
# Parts of a TATS training checkpoint that encoding and decoding never use.
IGNORED_PREFIXES = ("image_discriminator.", "video_discriminator.", "perceptual_model.")
_RESERVED = ("format", "state_dict", "hyper_parameters")


class TokenizerError(UserError):
    """A tokenizer checkpoint that cannot be used; one line naming the file and what is wrong."""


def save_tokenizer(model: VQGAN, path: str | Path, extra: dict | None = None) -> None:
    """Write ``model`` in the Lightning-like layout (args as a plain dict) plus the plain values in ``extra``."""
    extra = dict(extra or {})
    clash = [k for k in _RESERVED if k in extra]
    if clash:
        raise TokenizerError(f"save_tokenizer extra may not use the reserved keys {clash}")
    atomic_save({"format": FORMAT,
                 "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                 "hyper_parameters": {"args": to_dict(model.cfg)}, **extra}, path)


def tokenizer_sha256(path: str | Path) -> str:
    """Hex SHA-256 of the file's bytes, so code grids can record exactly which tokenizer made them."""
    return file_sha256(path)


def read_checkpoint(path: Path, map_location="cpu") -> dict:
    """The payload of a tokenizer file the user named (``load_user_file``: no code in it is run)."""
    return load_user_file(path, f"tokenizer checkpoint '{path}'", TokenizerError, map_location)


def config_from_args(args, what: str) -> VQGANConfig:
    """The model hyperparameters out of TATS's Namespace or our dict (training-only fields are ignored)."""
    args = vars(args) if isinstance(args, argparse.Namespace) else args
    if not isinstance(args, dict):
        raise TokenizerError(f"{what} has no hyper_parameters['args']; it is not a TATS VQGAN or mebt tokenizer "
                             "checkpoint")
    names = {f.name for f in dataclasses.fields(VQGANConfig)}
    try:
        return from_dict(VQGANConfig, {k: v for k, v in args.items() if k in names})
    except ConfigError as e:
        raise TokenizerError(f"{what} has unusable hyperparameters: {e}") from None


def model_from_checkpoint(ckpt, what: str) -> VQGAN:
    """Rebuild the VQGAN in ``ckpt`` (already loaded); strict on every key except the ignored prefixes."""
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise TokenizerError(f"{what} has no 'state_dict' mapping; it is not a TATS VQGAN or mebt tokenizer checkpoint")
    hparams = ckpt.get("hyper_parameters")
    cfg = config_from_args(hparams.get("args") if isinstance(hparams, dict) else None, what)
    state = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith(IGNORED_PREFIXES)}
    with torch.device("meta"):  # shapes only: no memory and no random init for weights about to be replaced
        model = VQGAN(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    try:
        check_state_dict(state, expected, what, f" (for a VQGAN with {_describe(cfg)})")
    except CheckpointError as e:
        raise TokenizerError(str(e)) from None
    # Half-precision saves are widened: the tokenizer always runs in float32.
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _describe(cfg: VQGANConfig) -> str:
    return (f"n_hiddens {cfg.n_hiddens}, downsample {list(cfg.downsample)}, embedding_dim {cfg.embedding_dim}, "
            f"n_codes {cfg.n_codes}, norm_type {cfg.norm_type}")


def load_tokenizer(path: str | Path, map_location="cpu") -> VQGAN:
    """The VQGAN in a TATS Lightning checkpoint or a file written by ``save_tokenizer``, in eval mode.

    TATS files pickle an ``argparse.Namespace`` (and possibly more, such as Lightning callbacks' state):
    ``read_checkpoint`` rebuilds the Namespace and keeps anything else as an inert record, never running it.
    """
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"tokenizer checkpoint '{path}' does not exist; pass a TATS VQGAN .ckpt or train one "
                             "with `mebt tokenizer train`")
    return model_from_checkpoint(read_checkpoint(path, map_location), f"tokenizer checkpoint '{path}'")
