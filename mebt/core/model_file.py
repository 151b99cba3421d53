"""The portable model file: one ``torch.save`` payload that rebuilds a ``MeBT`` without DeepSpeed.

Layout: ``{"format": "mebt-model-v1", "model_type": "mebt", "config": <MeBTConfig as a dict>,
"state_dict": <parameters>, **extra}``. Files are written to a temporary name and renamed, so a crash
never leaves a half-written model behind, and read with ``weights_only=True``, so loading one cannot
run code. Every problem is a single ``CheckpointError`` line that names the file and the keys.
"""
from __future__ import annotations

import argparse
import logging
import pickle
from pathlib import Path
from typing import Iterable, Mapping

import torch

from mebt.config import from_dict, to_dict
from mebt.core.model import MeBT, MeBTConfig
from mebt.errors import ConfigError, UserError, first_line
from mebt.fsutil import atomic_write
from mebt.safe_unpickle import UnsafePickleError, load_torch_file

log = logging.getLogger(__name__)

FORMAT = "mebt-model-v1"
_RESERVED = ("format", "model_type", "config", "state_dict")


class CheckpointError(UserError):
    """A model or checkpoint file that cannot be used; the message is one line naming the file and keys."""


def load_user_file(path: str | Path, what: str, error: type = None, map_location="cpu", mmap: bool = False):
    """``torch.load`` a checkpoint the user named, without running code stored in it.

    First ``weights_only=True`` (this project's files); then the same with ``argparse.Namespace``
    allow-listed (TATS and Lightning pickle their hyper-parameters as one); a file that pickles other
    objects (official MeBT checkpoints hold omegaconf configs) is read by ``safe_unpickle.load_torch_file``,
    which keeps each of those objects as an inert ``PickledObject`` record instead of importing and calling
    its class. ``what`` names the file in the one-line ``error`` (default CheckpointError) raised when it
    cannot be read.
    """
    error = error or CheckpointError
    for allow in ([], [argparse.Namespace]):
        try:
            with torch.serialization.safe_globals(allow):
                return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except pickle.UnpicklingError:
            pass  # only the weights-only check refused it: try the next reader
        except Exception as e:  # torch raises several types for damaged or foreign files
            raise error(f"{what} could not be read by torch.load ({first_line(e)})") from None
    log.info("%s pickles objects beyond tensors; reading them as inert records", what)
    try:
        return load_torch_file(path, what, map_location=map_location, mmap=mmap)
    except UnsafePickleError as e:
        raise error(str(e)) from None


def _listed(keys: Iterable[str], limit: int = 8) -> str:
    keys = list(keys)
    shown = ", ".join(f"'{k}'" for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _plural(word: str, n: int) -> str:
    return word if n == 1 else word + "s"


def check_state_dict(found: Mapping, expected: Mapping[str, tuple], what: str, hint: str = "") -> None:
    """Raise one CheckpointError naming every missing, unexpected and wrongly shaped key of ``found``.

    ``expected`` maps each key to its shape; ``what`` names the source in the message ("model file 'x'").
    All problems go into the one line, because a renamed key shows up as one missing plus one unexpected.
    """
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    not_tensors = [k for k in found if k in expected and not isinstance(found[k], torch.Tensor)]
    wrong = [f"'{k}' of shape {list(found[k].shape)} where {list(expected[k])} is expected"
             for k in found if k in expected and k not in not_tensors and tuple(found[k].shape) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"is missing {_plural('key', len(missing))} {_listed(missing)}")
    if unexpected:
        problems.append(f"has unexpected {_plural('key', len(unexpected))} {_listed(unexpected)}")
    if not_tensors:
        problems.append(f"holds non-tensor values under {_listed(not_tensors)}")
    if wrong:
        problems.append(f"has {_plural('key', len(wrong))} {'; '.join(wrong[:8])}"
                        + (f" and {len(wrong) - 8} more" if len(wrong) > 8 else ""))
    if problems:
        raise CheckpointError(f"{what} {'; '.join(problems)}{hint}")


def expected_shapes(cfg: MeBTConfig) -> dict[str, tuple]:
    """Parameter names and shapes of ``MeBT(cfg)``, found on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = MeBT(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def model_from_state_dict(cfg: MeBTConfig, state_dict: Mapping, what: str, hint: str = "") -> MeBT:
    """``MeBT(cfg)`` holding exactly ``state_dict`` (strict: keys and shapes are checked first).

    The model is built on the meta device and the loaded tensors are assigned, not copied: a full-size
    model would otherwise be randomly initialised and held twice in memory just to be overwritten.
    """
    check_state_dict(state_dict, expected_shapes(cfg), what, hint)
    with torch.device("meta"):
        model = MeBT(cfg)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model


def atomic_save(payload, path: str | Path) -> None:
    """``torch.save`` through ``mebt.fsutil.atomic_write``: a crash leaves no partial file."""
    with atomic_write(path) as tmp:
        torch.save(payload, tmp)


def save_model(model: MeBT, path: str | Path, extra: dict | None = None) -> None:
    """Write ``model`` (config + parameters, on CPU) and the plain values in ``extra`` to ``path``.

    ``extra`` must hold only what ``torch.load(weights_only=True)`` accepts (numbers, strings, lists,
    dicts, tensors), e.g. ``{"step": 1000, "source": "..."}``.
    """
    extra = dict(extra or {})
    clash = [k for k in _RESERVED if k in extra]
    if clash:
        raise CheckpointError(f"save_model extra may not use the reserved {_plural('key', len(clash))} {_listed(clash)}")
    payload = {
        "format": FORMAT,
        "model_type": "mebt",
        "config": to_dict(model.cfg),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **extra,
    }
    atomic_save(payload, path)


def load_tensors_file(path: str | Path, what: str, absent: str, expected: str, map_location="cpu"):
    """``torch.load(weights_only=True)`` of a file the user names, with one-line errors for an absent
    (``absent`` says where to get one) or unreadable (not ``expected``) file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} '{path}' does not exist{absent}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for foreign or corrupt files
        raise CheckpointError(f"{what} '{path}' is not {expected}: torch.load failed ({first_line(e)})") from None


def read_model_file(path: str | Path, map_location="cpu") -> dict:
    """The checked payload of a model file (format, config and state dict present)."""
    payload = load_tensors_file(path, "model file", " (write one with save_model or `mebt convert-official CKPT OUT`)",
                                "a mebt model file", map_location)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"model file '{path}' is not a mebt model file (format {found!r}, expected "
                              f"'{FORMAT}'); an official MeBT checkpoint must first be converted with "
                              "`mebt convert-official CKPT OUT`")
    for key in ("config", "state_dict"):
        if not isinstance(payload.get(key), dict):
            raise CheckpointError(f"model file '{path}' has no '{key}' mapping; it is damaged or was not written by save_model")
    return payload


def load_model(path: str | Path, map_location="cpu") -> MeBT:
    """Rebuild the ``MeBT`` saved by ``save_model`` (strict: every key and shape must match), in eval mode."""
    return load_model_with_extras(path, map_location)[0]


def load_model_with_extras(path: str | Path, map_location="cpu") -> tuple[MeBT, dict]:
    """``load_model`` plus the file's other values (``extra`` of ``save_model``), reading the file once."""
    payload = read_model_file(path, map_location)
    try:
        cfg = from_dict(MeBTConfig, payload["config"])
    except ConfigError as e:
        raise CheckpointError(f"model file '{path}' has an invalid config: {e}") from None
    model = model_from_state_dict(cfg, payload["state_dict"], f"model file '{path}'",
                                  " (it does not match its own config; was it edited by hand?)")
    return model.eval(), {k: v for k, v in payload.items() if k not in ("config", "state_dict")}
