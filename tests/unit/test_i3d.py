"""I3D: exact weights-file layout, strict loading with one-line errors, preprocessing and a real forward."""
from pathlib import Path

import numpy as np
import pytest
import torch

from mebt.core.model_file import CheckpointError
from mebt.eval.i3d import MIN_FRAMES, WEIGHTS_NAME, I3DInputError, InceptionI3d, i3d_features, preprocess, same_padding
from mebt.eval.i3d_weights import load_i3d
from mebt.fsutil import file_sha256
from mebt.media import to_uint8

# The real weights file's layout (copied from shared/reference/ so the suite runs from any clone).
LAYOUT = Path(__file__).resolve().parents[1] / "data" / "i3d_kinetics400_state_dict.tsv"


def read_layout() -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    layout = {}
    for line in LAYOUT.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, dtype = line.split("\t")
        dims = tuple(int(s) for s in shape.strip("[]").split(",") if s.strip())
        layout[key] = (dims, getattr(torch, dtype))
    return layout


def fabricated_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors in exactly the file's layout, scaled so activations stay O(1) through the net."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, (shape, dtype) in read_layout().items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(100, dtype=dtype)
        elif key.endswith("conv3d.weight"):
            fan_in = int(np.prod(shape[1:]))
            state[key] = torch.randn(shape, generator=g, dtype=dtype) * (2.0 / fan_in) ** 0.5
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g, dtype=dtype) + 0.5
        elif key.endswith("bn.weight"):
            state[key] = torch.rand(shape, generator=g, dtype=dtype) * 0.5 + 0.75
        else:  # bn.bias, running_mean, logits bias
            state[key] = torch.randn(shape, generator=g, dtype=dtype) * 0.1
    return state


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    state = fabricated_state_dict()
    path = tmp_path_factory.mktemp("i3d") / WEIGHTS_NAME
    torch.save(state, path)
    return path, state


def test_model_has_exactly_the_file_layout():
    layout = read_layout()
    assert len(layout) == 344
    found = {k: (tuple(v.shape), v.dtype) for k, v in InceptionI3d().state_dict().items()}
    assert found == layout


def test_load_with_and_without_num_batches_tracked(weights, tmp_path):
    path, state = weights
    model = load_i3d(path)
    assert not model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert model.Mixed_3b.b0.bn.eps == 1e-3 and model.Conv3d_1a_7x7.bn.eps == 1e-3   # TF numerics by default
    assert model.network["network"] == f"sha256:{file_sha256(path)}" and model.network["numerics"] == "tf"
    tats = load_i3d(path, numerics="tats")
    assert {m.eps for m in tats.modules() if isinstance(m, torch.nn.BatchNorm3d)} == {1e-5}
    assert tats.network["bn_eps"] == 1e-5
    # Converted files omit the BatchNorm step counters.
    stripped = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert len(stripped) == 344 - 57
    torch.save(stripped, tmp_path / "stripped.pt")
    model = load_i3d(tmp_path / "stripped.pt")
    assert torch.equal(model.logits.conv3d.weight, state["logits.conv3d.weight"])


def one_line_error(path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_i3d(path)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("change, key", [
    ("missing", "Mixed_4c.b1b.conv3d.weight"),
    ("extra", "Mixed_6a.b0.conv3d.weight"),
    ("shape", "Conv3d_2c_3x3.bn.running_var"),
    ("extra", "Mixed_3b.b3a.bn.num_batches_tracked"),  # a counter the model has no BatchNorm for
])
def test_bad_layouts_are_one_line_errors_naming_the_key(weights, tmp_path, change, key):
    state = dict(weights[1])
    if change == "missing":
        del state[key]
    elif change == "extra":
        state[key] = torch.zeros(3)
    else:
        state[key] = torch.ones(7)
    torch.save(state, tmp_path / "bad.pt")
    message = one_line_error(tmp_path / "bad.pt")
    assert f"'{key}'" in message
    assert {"missing": "missing", "extra": "unexpected", "shape": "shape [7]"}[change] in message


def test_absent_or_foreign_files_are_one_line_errors(tmp_path):
    message = one_line_error(tmp_path / "nowhere.pt")
    assert WEIGHTS_NAME in message and "standard I3D when --i3d is not given" in message
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    assert "is not a state dict like" in one_line_error(tmp_path / "junk.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    assert "not a state dict" in one_line_error(tmp_path / "list.pt")


def test_same_padding_matches_tensorflow():
    # (size, kernel, stride) -> total pad; output size is ceil(size / stride) with the extra pixel at the end.
    assert same_padding((16, 224, 224), (7, 7, 7), (2, 2, 2)) == (2, 3, 2, 3, 2, 3)
    assert same_padding((9, 56, 56), (3, 3, 3), (1, 1, 1)) == (1, 1, 1, 1, 1, 1)
    assert same_padding((8, 56, 55), (1, 3, 3), (1, 2, 2)) == (1, 1, 0, 1, 0, 0)
    assert same_padding((3, 14, 14), (2, 2, 2), (2, 2, 2)) == (0, 0, 0, 0, 0, 1)


def test_preprocess():
    videos = torch.zeros(2, 3, 32, 48, 3, dtype=torch.uint8)
    videos[1] = 255
    videos[0, :, :, :, 1] = 128
    x = preprocess(videos)
    assert x.shape == (2, 3, 3, 224, 224) and x.dtype == torch.float32
    assert torch.all(x[1] == 1.0)
    assert torch.all(x[0, 0] == -1.0) and torch.all(x[0, 2] == -1.0)
    assert torch.allclose(x[0, 1], torch.tensor(128 / 255 * 2 - 1), atol=1e-6)
    # Bilinear, align_corners=False, per frame and channel.
    frames = torch.randint(0, 256, (1, 2, 20, 30, 3), dtype=torch.uint8)
    expected = torch.nn.functional.interpolate(frames[0].permute(0, 3, 1, 2).float() / 255, size=(224, 224),
                                               mode="bilinear", align_corners=False) * 2 - 1
    assert torch.allclose(preprocess(frames)[0].permute(1, 0, 2, 3), expected, atol=1e-6)
    with pytest.raises(I3DInputError, match="uint8 videos"):
        preprocess(torch.zeros(1, 3, 4, 8, 8))  # float channels-first: must go through from_decoded


def test_decoded_pixels_are_rounded_or_truncated():
    decoded = torch.rand(2, 3, 4, 8, 8) * 1.4 - 0.7  # overshoots [-0.5, 0.5] like real decoder output
    u8 = to_uint8(decoded)
    assert u8.dtype == np.uint8 and u8.shape == (2, 4, 8, 8, 3)
    assert to_uint8(torch.full((1, 3, 1, 2, 2), -0.5)).min() == 0 and to_uint8(torch.full((1, 3, 1, 2, 2), 0.5)).max() == 255
    edge = torch.tensor(0.5 / 255 - 0.5 + 1e-4).expand(1, 3, 1, 1, 1)
    assert (to_uint8(edge) == 1).all() and (to_uint8(edge, pixels="truncate") == 0).all()
    truncated = to_uint8(decoded, pixels="truncate").astype(int)
    assert ((u8.astype(int) - truncated) >= 0).all() and ((u8.astype(int) - truncated) <= 1).all()
    assert (u8 != truncated).mean() > 0.3   # about half the pixels round up


def test_forward_gives_finite_400d_features(weights):
    """One real forward at 224x224 with the minimum frame count (MIN_FRAMES=9; ~0.3 s on 2 CPU cores)."""
    model = load_i3d(weights[0])
    torch.manual_seed(0)
    videos = torch.randint(0, 256, (2, MIN_FRAMES, 64, 64, 3), dtype=torch.uint8)
    feats = i3d_features(model, videos, batch_size=2)
    assert feats.shape == (2, 400) and feats.dtype == np.float64
    assert np.isfinite(feats).all() and feats.std() > 0
    assert not np.allclose(feats[0], feats[1])  # different videos, different features
    with pytest.raises(I3DInputError, match=f"T >= {MIN_FRAMES}"):
        model.features(torch.zeros(1, 3, MIN_FRAMES - 1, 224, 224))
    with pytest.raises(I3DInputError, match="224, 224"):
        model.features(torch.zeros(1, 3, 16, 112, 112))


class MeanPixel(torch.nn.Module):
    """Stands in for I3D to check i3d_features' batching cheaply: feature = per-channel mean of the input."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))  # i3d_features finds the device from a parameter

    def features(self, x):
        assert x.shape[1:] == (3, 2, 224, 224)
        return x.mean(dim=(2, 3, 4))


def test_i3d_features_batches_in_order():
    videos = torch.arange(5, dtype=torch.uint8).mul(50).view(5, 1, 1, 1, 1).expand(5, 2, 8, 8, 3)
    feats = i3d_features(MeanPixel(), videos.numpy(), batch_size=2)  # numpy input, 3 batches (2, 2, 1)
    assert feats.dtype == np.float64
    assert np.allclose(feats, (np.arange(5)[:, None] * 50 / 255 - 0.5) * 2 * np.ones((1, 3)), atol=1e-6)
