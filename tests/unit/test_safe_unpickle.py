"""The restricted torch unpickler: tensors and plain containers come back as torch builds them, every other
object as an inert record that keeps its name and arguments, and omegaconf records read as plain values.

``load_numpy_tree`` is tested with the I3D weights it exists for (tests/test_i3d_standard.py).
"""
import argparse
import io
import os
import pickle
from collections import OrderedDict, defaultdict
from fractions import Fraction

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from mebt.safe_unpickle import RECORDS_PICKLE_MODULE, PickledObject, UnsafePickleError, load_torch_file, plain


def lightning_like_checkpoint() -> dict:
    """Everything a Lightning or TATS checkpoint pickles besides its own classes: tensors of several dtypes,
    a parameter, real optimizer and scheduler states, callback states, a Namespace, bytes, sets, ..."""
    param = torch.nn.Parameter(torch.randn(3, 2))
    optim = torch.optim.AdamW([param], lr=3e-4, betas=(0.9, 0.95))
    param.sum().backward()
    optim.step()
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda step: 1.0)
    return {"epoch": 3, "global_step": 1000, "pytorch-lightning_version": "1.7.5",
            "state_dict": OrderedDict(w=torch.randn(4, 4), h=torch.ones(2, dtype=torch.half),
                                      n=torch.tensor(7), b=torch.tensor([True, False]),
                                      view=torch.arange(12.0).reshape(3, 4)[1:, ::2]),
            "optimizer_states": [optim.state_dict()], "lr_schedulers": [sched.state_dict()],
            "callbacks": {"ModelCheckpoint{'monitor': 'val/loss'}": {"best_model_score": torch.tensor(0.5),
                                                                     "best_k_models": {"a.ckpt": torch.tensor(0.5)}}},
            "hyper_parameters": {"args": argparse.Namespace(n_codes=16384, downsample=[4, 8, 8], norm_type="group"),
                                 "param": param, "size": torch.Size([2, 3]), "dtype": torch.bfloat16,
                                 "device": torch.device("cpu"), "bytes": b"\x00\xffab", "empty": b"",
                                 "set": {1, 2}, "frozen": frozenset({"a"}), "counts": defaultdict(list, a=[1]),
                                 "slice": slice(1, None, 2), "complex": 1 + 2j, "tuple": (1, None, True, 2.5)}}


def assert_same(got, want, path="ckpt"):
    assert type(got) is type(want), path
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.requires_grad == want.requires_grad and torch.equal(got, want), path
    elif isinstance(want, dict):
        assert list(got) == list(want), path
        for key in want:
            assert_same(got[key], want[key], f"{path}/{key}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{path}/{i}")
    elif isinstance(want, argparse.Namespace):
        assert_same(vars(got), vars(want), path)
    else:
        assert got == want, path


@pytest.mark.parametrize("fmt", ["zip", "zip-mmap", "legacy"])
def test_lightning_checkpoint_loads_exactly_as_torch_builds_it(tmp_path, fmt):
    # The restricted reader refuses and records nothing a Lightning/TATS checkpoint needs.
    ckpt = lightning_like_checkpoint()
    path = tmp_path / "ckpt.pt"
    torch.save(ckpt, path, _use_new_zipfile_serialization=fmt != "legacy")
    got = load_torch_file(path, mmap=fmt == "zip-mmap")
    assert_same(got, torch.load(path, weights_only=False))
    assert_same(got, ckpt)
    assert got["hyper_parameters"]["counts"].default_factory is list


class Sentinel:
    """Fails the test if any of its code runs while a pickle of it is read."""
    def __init__(self, value):
        self.value = value

    def __setstate__(self, state):
        raise AssertionError("Sentinel.__setstate__ ran")


class SentinelDict(dict):
    def __setitem__(self, key, value):
        raise AssertionError("SentinelDict.__setitem__ ran")


class SentinelList(list):
    def append(self, value):
        raise AssertionError("SentinelList.append ran")

    def extend(self, values):
        raise AssertionError("SentinelList.extend ran")


class Slotted:
    __slots__ = ("a",)

    def __init__(self):
        self.a = 1


class Shell:
    """Pickles as a call of os.system, the way a hostile file runs code."""
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def records_of(obj, protocol):
    return RECORDS_PICKLE_MODULE.load(io.BytesIO(pickle.dumps(obj, protocol=protocol)))


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_other_objects_are_records_of_name_arguments_and_state(tmp_path, protocol):
    marker = tmp_path / "ran"
    sentinel_dict = SentinelDict()
    dict.__setitem__(sentinel_dict, "k", 1)
    sentinel_dict.note = "attr"
    sentinel_list = SentinelList()
    list.extend(sentinel_list, [1, 2])
    objects = {"call": Shell(f"touch '{marker}'"), "obj": Sentinel(3), "dict": sentinel_dict, "list": sentinel_list,
               "scalar": np.float32(1.5), "fraction": Fraction(1, 3), "type": Sentinel}
    if protocol >= 2:   # protocols 0 and 1 cannot pickle __slots__ objects at all
        objects["slots"] = Slotted()
    got = records_of(objects, protocol)

    assert not marker.exists()
    call = got["call"]
    assert isinstance(call, PickledObject) and call.pickled_global == f"{os.name}.system"
    assert call.args == (f"touch '{marker}'",)
    assert got["obj"].pickled_global == f"{__name__}.Sentinel" and got["obj"].state == {"value": 3}
    # Protocol 0 passes a container subclass's items to copyreg._reconstructor, later ones store them.
    assert (got["dict"].args[0] if protocol == 0 else got["dict"].dict_items) == {"k": 1}
    assert got["dict"].state == {"note": "attr"}
    assert (got["list"].args[0] if protocol == 0 else got["list"].list_items) == [1, 2]
    assert protocol < 2 or got["slots"].state == (None, {"a": 1})   # (__dict__, slot values)
    assert got["scalar"].pickled_global.endswith("multiarray.scalar") and got["scalar"].args[1] == np.float32(1.5).tobytes()
    assert got["fraction"].args == (1, 3)
    assert isinstance(got["type"], type) and issubclass(got["type"], PickledObject)
    assert repr(got["type"]) == f"<pickled class {__name__}.Sentinel>"


def test_the_records_are_what_a_plain_unpickler_would_run(tmp_path):
    # The control for the test above: pickle itself calls os.system on the same bytes.
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Shell(f"touch '{marker}'"), protocol=2))
    assert marker.exists()


@pytest.mark.parametrize("data, words", [
    # copyreg._reconstructor(list, <posix.system>, None): a base this reader does not admit
    (b"\x80\x02ccopy_reg\n_reconstructor\nc__builtin__\nlist\ncposix\nsystem\nN\x87R.", "copyreg._reconstructor of"),
    # _codecs.encode(b"...", "zlib_codec"): bytes need latin1 only
    (b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\n\x00\x00\x00zlib_codec\x86R.", "codec 'zlib_codec'"),
])
def test_admitted_helpers_refuse_what_they_do_not_need(data, words):
    with pytest.raises(UnsafePickleError, match=words):
        RECORDS_PICKLE_MODULE.load(io.BytesIO(data))


def test_unreadable_file_is_one_line_naming_it(tmp_path):
    with pytest.raises(UnsafePickleError, match=r"^torch file '.*nope.pt' could not be read by torch.load \("):
        load_torch_file(tmp_path / "nope.pt")
    path = tmp_path / "bad.pt"
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(UnsafePickleError) as err:
        load_torch_file(path, "tokenizer checkpoint 'bad.pt'")
    assert str(err.value).startswith("tokenizer checkpoint 'bad.pt' could not be read") and "\n" not in str(err.value)


CONFIGS = [
    {"n_head": 4, "mode": ["latent_enc", "lt2l"], "f": 0.1, "flag": True, "none": None, "s": "longest",
     "nested": {"shape": [2, 4, 4], "deeper": {"list_of_dicts": [{"a": 1}, {"b": [None, 2.5]}]}},
     "missing": "???", "interpolated": "${n_head}", "empty": {}, "empty_list": []},
    [1, "two", {"three": [3]}],
]


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("content", CONFIGS)
def test_plain_turns_real_omegaconf_pickles_into_plain_values(tmp_path, content, protocol):
    cfg = OmegaConf.create(content)
    path = tmp_path / "cfg.pt"
    torch.save({"cfg": cfg, "other": Fraction(1, 3), "od": OrderedDict(a=cfg)}, path, pickle_protocol=protocol)
    loaded = load_torch_file(path)
    assert isinstance(loaded["cfg"], PickledObject)   # as read: records, omegaconf was never asked

    got = plain(loaded)

    want = OmegaConf.to_container(cfg, resolve=False)
    assert got["cfg"] == want and type(got["cfg"]) is type(want)
    assert got["od"] == {"a": want} and type(got["od"]) is dict
    assert isinstance(got["other"], PickledObject) and got["other"].args == (1, 3)   # other records stay
