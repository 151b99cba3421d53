"""Convert a released MeBT checkpoint (the official Lightning ``Net2NetTransformer``) to a mebt model file.

The official layout (see ``shared/reference/mebt_official_16f_state_dict.tsv``) maps one to one onto
``mebt.core.model.MeBT``: the transformer lives under ``transformer.``, the latent array is called
``sos_emb`` and the three embedding parameters carry leading batch dimensions of size 1. The frozen
VQGAN under ``first_stage_model.`` is the tokenizer, loaded separately, and is dropped; any other key
is an error, so a checkpoint of a different model cannot be half-converted without notice.

The shapes give the width, depth, vocabulary, latents and sequence length, but not the head count, the
code grid or the block kinds. A Lightning checkpoint records those in ``ckpt["hyper_parameters"]``, the
``Net2NetTransformer`` init arguments (``save_hyperparameters``): ``transformer_config`` (the YAML's
``model.params``: n_head, mode, ...) and ``mask_config`` (``params.shape``: the code grid), pickled as
omegaconf configs. They are read without omegaconf and without running the pickle
(``safe_unpickle.load_torch_file``, ``plain``), used by default, checked against the state dict's shapes,
and a parameter given explicitly must agree with them. A bare state dict records nothing: then ``n_head``
(default 16, as in every published config), ``latent_shape`` (default ``(block_size // 256, 16, 16)``:
128x128 frames give 16x16 codes) and ``layer_plan`` (default: the paper's plan) are the parameters.
"""
from __future__ import annotations

import logging
import math
import re
import zipfile
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

from mebt.core.model import LAYER_KINDS, MeBTConfig, paper_layer_plan
from mebt.core.model_file import (
    CheckpointError,
    check_state_dict,
    expected_shapes,
    load_user_file,
    model_from_state_dict,
    save_model,
)
from mebt.safe_unpickle import PickledObject, plain

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

# Where ckpt["hyper_parameters"] records each setting: the init argument, then the keys inside it.
_RECORDED = {
    "n_head": ("transformer_config", "n_head"),
    "n_layer": ("transformer_config", "n_layer"),
    "n_embd": ("transformer_config", "n_embd"),
    "vocab_size": ("transformer_config", "vocab_size"),
    "block_size": ("transformer_config", "block_size"),
    "n_latent": ("transformer_config", "sos_emb"),
    "layer_plan": ("transformer_config", "mode"),
    "latent_shape": ("mask_config", "params", "shape"),
}
# Recorded for the converted file's extras only: mebt's one dropout rate is left at 0 (inference).
_DROPOUTS = ("embd_pdrop", "resid_pdrop", "attn_pdrop")
# The parameters a caller may give, as the convert-official flags spell them.
_FLAGS = {"n_head": "--n-head", "latent_shape": "--latent-shape", "layer_plan": "--layer-plan"}


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


def state_dict_sizes(sd: Mapping) -> dict:
    """vocab_size, n_embd, n_latent, block_size and n_layer read off an official state dict's shapes."""
    vocab_size, n_embd = _shape(sd, "tok_emb.weight", 2, "[vocab_size, n_embd]")
    n_latent = _shape(sd, "sos_emb", 3, "[1, n_latent, n_embd]")[1]
    block_size = _shape(sd, "pos_emb", 3, "[1, block_size, n_embd]")[1]
    blocks = {int(m.group(1)) for k in sd if (m := _BLOCK_KEY.match(k))}
    if not blocks:
        raise CheckpointError(f"{_WHAT} has no 'transformer.blocks.*' keys{_HINT}")
    # A gap in the numbering shows up later as missing keys of the absent block.
    return {"vocab_size": vocab_size, "n_embd": n_embd, "n_latent": n_latent, "block_size": block_size,
            "n_layer": max(blocks) + 1}


def infer_config(sd: Mapping, n_head: int = 16, latent_shape: Optional[Sequence[int]] = None,
                 layer_plan: Optional[Sequence[str]] = None, numerics: str = "official") -> MeBTConfig:
    """MeBTConfig read off the shapes of an official state dict (transformer keys only)."""
    sizes = state_dict_sizes(sd)
    block_size = sizes["block_size"]
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
    plan = list(layer_plan) if layer_plan is not None else paper_layer_plan(sizes["n_layer"])
    return MeBTConfig(vocab_size=sizes["vocab_size"], latent_shape=latent_shape, block_size=block_size,
                      n_layer=sizes["n_layer"], layer_plan=plan, n_embd=sizes["n_embd"], n_head=n_head,
                      n_latent=sizes["n_latent"], numerics=numerics)


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


def read_official_checkpoint(ckpt_path: str | Path) -> tuple[dict, Optional[dict]]:
    """(state dict, hyper-parameters or None) of an official checkpoint (Lightning or a bare state dict).

    Read by ``load_user_file``: no code stored in the file runs, and omegaconf need not be installed. The
    hyper-parameters come back as plain dicts and lists (``safe_unpickle.plain``); objects of other classes
    stay inert ``PickledObject`` records. Memory-mapping keeps the optimizer states and the VQGAN on disk.
    """
    path = Path(ckpt_path)
    if not path.is_file():
        raise CheckpointError(f"official MeBT checkpoint '{path}' does not exist; download it from the MeBT "
                              "release and pass its path")
    mmap = zipfile.is_zipfile(path)  # files in the legacy (pre-torch-1.6) format cannot be memory-mapped
    ckpt = load_user_file(path, f"official MeBT checkpoint '{path}'", mmap=mmap)
    if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict):
        hparams = plain(ckpt.get("hyper_parameters"))
        return ckpt["state_dict"], hparams if isinstance(hparams, dict) else None
    if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt, None
    top = _top_level(ckpt)
    raise CheckpointError(f"official MeBT checkpoint '{path}' holds neither a Lightning 'state_dict' nor a bare "
                          f"state dict ({top})")


def _lookup(hparams: Mapping, path: Sequence[str]):
    node = hparams
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _valid(name: str, value) -> tuple[bool, str]:
    """(whether ``value`` can be the setting ``name``, what is expected instead)."""
    if name == "latent_shape":
        ok = isinstance(value, list) and len(value) == 3 and all(_is_count(v) for v in value)
        return ok, "three positive sizes [T, H, W]"
    if name == "layer_plan":
        return isinstance(value, list) and len(value) > 0 and all(isinstance(v, str) for v in value), "a list of block kinds"
    return _is_count(value), "a positive integer"


def recorded_settings(hparams: Optional[Mapping], what: str) -> dict:
    """The settings of ``_RECORDED`` and the dropout rates that ``hparams`` records ({} when it records none).

    ``hparams`` is the checkpoint's ``hyper_parameters`` made plain; a setting it lacks is left out. A value
    of the wrong kind (say an unresolved ``${...}`` interpolation, or a block kind mebt lacks) is one
    CheckpointError line naming the key.
    """
    if not hparams or hparams.get("transformer_config") is None:
        return {}
    if not isinstance(hparams["transformer_config"], Mapping):
        raise CheckpointError(f"{what} records hyper_parameters['transformer_config'] as "
                              f"{hparams['transformer_config']!r}, not a config mebt can read")
    found = {}
    for name, path in _RECORDED.items():
        value = _lookup(hparams, path)
        if value is None:
            continue
        value = list(value) if isinstance(value, tuple) else value
        ok, expected = _valid(name, value)
        if not ok:
            raise CheckpointError(f"{what} records {'.'.join(path)} = {value!r}, expected {expected}")
        found[name] = value
    unknown = [k for k in found.get("layer_plan", []) if k not in LAYER_KINDS]
    if unknown:
        raise CheckpointError(f"{what} records transformer_config.mode with block kind '{unknown[0]}', which mebt "
                              f"does not implement (known: {', '.join(LAYER_KINDS)})")
    for name in _DROPOUTS:
        value = _lookup(hparams, ("transformer_config", name))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            found[name] = float(value)
    return found


def check_recorded_sizes(recorded: Mapping, sizes: Mapping, what: str) -> None:
    """One CheckpointError line for every recorded setting that the state dict's shapes (``sizes``) contradict."""
    # The shapes are what the weights are: a recorded value that disagrees means the file was assembled
    # from different runs or edited, and no choice of settings converts it faithfully.
    wrong = [f"{'.'.join(_RECORDED[name])} = {recorded[name]} but the state dict has {name} {sizes[name]}"
             for name in ("n_embd", "vocab_size", "n_latent", "block_size", "n_layer")
             if name in recorded and recorded[name] != sizes[name]]
    if "layer_plan" in recorded and len(recorded["layer_plan"]) != sizes["n_layer"]:
        wrong.append(f"transformer_config.mode with {len(recorded['layer_plan'])} block kinds but the state dict "
                     f"has {sizes['n_layer']} blocks")
    if "latent_shape" in recorded and math.prod(recorded["latent_shape"]) != sizes["block_size"]:
        wrong.append(f"mask_config.params.shape = {recorded['latent_shape']} "
                     f"({math.prod(recorded['latent_shape'])} positions) but the state dict has block_size "
                     f"{sizes['block_size']}")
    if wrong:
        raise CheckpointError(f"{what} records {'; '.join(wrong)}; it is inconsistent and cannot be converted")


def resolve_settings(recorded: Mapping, given: Mapping, what: str) -> tuple[dict, dict]:
    """({setting: value}, {setting: "checkpoint" | "argument" | "default"}) for the settings in ``given``.

    The recorded value wins; a given one (not None) that contradicts it is a CheckpointError line naming
    the checkpoint's key and both values. None means the default of ``convert_official_state_dict``.
    """
    settings, origin = {}, {}
    for name, value in given.items():
        if name in recorded:
            if value is not None and _as_list(value) != _as_list(recorded[name]):
                shown = " ".join(str(v) for v in _as_list(value))
                raise CheckpointError(f"{what} records {'.'.join(_RECORDED[name])} = {recorded[name]}, but "
                                      f"{_FLAGS[name]} {shown} was given: omit {_FLAGS[name]} to use the "
                                      "checkpoint's value")
            settings[name], origin[name] = recorded[name], "checkpoint"
        else:
            settings[name], origin[name] = value, "default" if value is None else "argument"
    return settings, origin


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _top_level(obj) -> str:
    if isinstance(obj, PickledObject):
        return f"it holds a pickled {obj.pickled_global}"
    if not isinstance(obj, dict):
        return f"it holds a {type(obj).__name__}"
    keys = [str(k) for k in obj][:8]
    return "top-level keys: " + (", ".join(keys) or "none") + (" ..." if len(obj) > 8 else "")


def convert_official_file(ckpt_path: str | Path, out_path: str | Path, n_head: Optional[int] = None,
                          latent_shape: Optional[Sequence[int]] = None,
                          layer_plan: Optional[Sequence[str]] = None) -> MeBTConfig:
    """Convert the official checkpoint at ``ckpt_path`` into a mebt model file at ``out_path``.

    ``n_head``, ``latent_shape`` and ``layer_plan`` default to what the checkpoint's hyper-parameters
    record; given explicitly, they must agree with it (one CheckpointError line otherwise). For a bare
    state dict they default to 16 heads, ``(block_size // 256, 16, 16)`` and the paper's plan. The file is
    read without running code stored in it (``read_official_checkpoint``). The output, written under a
    temporary name and renamed (``save_model``), also records where its settings came from; returns its
    config.
    """
    what = f"official MeBT checkpoint '{ckpt_path}'"
    sd, hparams = read_official_checkpoint(ckpt_path)
    recorded = recorded_settings(hparams, what)
    if not recorded:
        log.info("%s records no transformer_config hyper-parameters: using the given or default head count, "
                 "grid and layer plan", what)
    check_recorded_sizes(recorded, state_dict_sizes({k: v for k, v in sd.items()
                                                     if not k.startswith(IGNORED_PREFIXES)}), what)
    settings, origin = resolve_settings(recorded, {"n_head": n_head, "latent_shape": latent_shape,
                                                   "layer_plan": layer_plan}, what)
    n_head = 16 if settings["n_head"] is None else settings["n_head"]
    cfg, sd = convert_official_state_dict(sd, n_head, settings["latent_shape"], settings["layer_plan"])
    model = model_from_state_dict(cfg, sd, _WHAT)
    # Plain values only (the model file is read with weights_only=True): what the checkpoint recorded,
    # dropout rates included, and where each of the three settings came from.
    save_model(model, out_path, extra={"source": f"official MeBT checkpoint {Path(ckpt_path).name}",
                                       "official_hparams": recorded, "settings_from": origin})
    return cfg
