"""The TATS 3D VQGAN video tokenizer (Ge et al., ECCV 2022) that MeBT works on, in one file.

A video [B, 3, T, H, W] in [-0.5, 0.5] is encoded by a 3D conv net to a [T/dt, H/dh, W/dw] grid of
vectors, each snapped to its nearest codebook entry; the grid of entry indices is what MeBT models.
Module and parameter names follow TATS exactly, so a TATS Lightning checkpoint's ``state_dict`` loads
strictly (see ``mebt.tokenizer.checkpoint``); its discriminators and LPIPS network are not part of this model.

Shape of the nets (``n_hiddens`` = nh, ``downsample`` = (dt, dh, dw), n = log2 of the largest factor):
encoder = conv_first 3->nh, n x [kernel-4 conv with stride 2 on each axis still to be reduced,
ResBlock], norm+SiLU; decoder = norm+SiLU, n x [kernel-4 transposed conv, 2 ResBlocks], conv_last ->3.
The codebook is trained by exponential moving averages (no gradients) with random restarts of dead codes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from mebt.config import check_at_least
from mebt.errors import ConfigError

EMA_DECAY = 0.99
COMMITMENT = 0.25
# Rows of the [rows, n_codes] distance matrix computed at once: bounds memory to 64 MB for any video length.
_DISTANCE_ELEMENTS = 1 << 24


@dataclass
class VQGANConfig:
    """TATS hyperparameter names; defaults are the released 4x8x8 tokenizer that MeBT uses."""
    embedding_dim: int = 256
    n_codes: int = 16384
    n_hiddens: int = 32
    downsample: tuple[int, int, int] = (4, 8, 8)   # T, H, W reduction factors (powers of two)
    image_channels: int = 3
    norm_type: Literal["group", "batch"] = "group"
    padding_type: Literal["replicate", "constant", "reflect", "circular"] = "replicate"
    num_groups: int = 32            # GroupNorm groups; TATS fixes 32, fewer allows tiny test models
    restart_thres: float = 1.0      # codes whose EMA usage count falls below this are restarted
    no_random_restart: bool = False

    def __post_init__(self):
        self.downsample = tuple(self.downsample)
        check_at_least(self, ("embedding_dim", "n_codes", "n_hiddens", "image_channels", "num_groups"), 1)
        if len(self.downsample) != 3 or any(d < 1 or d & (d - 1) for d in self.downsample) or max(self.downsample) < 2:
            raise ConfigError(f"config key 'downsample' must be three powers of two (T, H, W), at least one > 1, "
                              f"got {list(self.downsample)}")
        # The narrowest normalised layer has 2 * n_hiddens channels; every wider one is a multiple of it.
        if self.norm_type == "group" and (2 * self.n_hiddens) % self.num_groups:
            raise ConfigError(f"config key 'n_hiddens' must make 2 * n_hiddens divisible by num_groups "
                              f"({self.num_groups}) for GroupNorm, got {self.n_hiddens}")
        check_at_least(self, ("restart_thres",), 0)

    @property
    def n_blocks(self) -> int:
        return int(math.log2(max(self.downsample)))

    def block_strides(self) -> list[tuple[int, int, int]]:
        """Per block, stride 2 on the axes that still need halving: 4x8x8 -> (2,2,2), (2,2,2), (1,2,2).

        The decoder uses the same list, so its time axis is also doubled in the first blocks."""
        halvings = [int(math.log2(d)) for d in self.downsample]
        return [tuple(2 if i < h else 1 for h in halvings) for i in range(self.n_blocks)]


def same_padding(kernel: tuple[int, ...], stride: tuple[int, ...]) -> tuple[int, ...]:
    """F.pad amounts giving output = input / stride: total k - s per axis, the odd pixel in front."""
    pads = []
    for k, s in reversed(list(zip(kernel, stride))):  # F.pad lists the last axis first
        pads += [(k - s + 1) // 2, (k - s) // 2]
    return tuple(pads)


def _triple(x) -> tuple[int, int, int]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x, x)


class SamePadConv3d(nn.Module):
    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding_type: str = "replicate"):
        super().__init__()
        kernel, stride = _triple(kernel_size), _triple(stride)
        self.pad, self.mode = same_padding(kernel, stride), padding_type
        self.conv = nn.Conv3d(cin, cout, kernel, stride=stride)

    def forward(self, x):
        return self.conv(F.pad(x, self.pad, mode=self.mode))


class SamePadConvTranspose3d(nn.Module):
    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding_type: str = "replicate"):
        super().__init__()
        kernel, stride = _triple(kernel_size), _triple(stride)
        self.pad, self.mode = same_padding(kernel, stride), padding_type
        # Cropping k - 1 removes what the pre-padding adds, so the output is exactly input * stride.
        self.convt = nn.ConvTranspose3d(cin, cout, kernel, stride=stride, padding=tuple(k - 1 for k in kernel))

    def forward(self, x):
        return self.convt(F.pad(x, self.pad, mode=self.mode))


def norm_factory(cfg: VQGANConfig) -> Callable[[int], nn.Module]:
    if cfg.norm_type == "group":
        return lambda ch: nn.GroupNorm(cfg.num_groups, ch, eps=1e-6)
    # TATS trains with SyncBatchNorm; plain BatchNorm3d has the same parameters and buffers.
    return nn.BatchNorm3d


class ResBlock(nn.Module):
    """x + conv(SiLU(norm(conv(SiLU(norm(x)))))). TATS pads these convs by replication whatever padding_type."""

    def __init__(self, channels: int, norm: Callable[[int], nn.Module]):
        super().__init__()
        self.norm1 = norm(channels)
        self.conv1 = SamePadConv3d(channels, channels, 3)
        self.norm2 = norm(channels)
        self.conv2 = SamePadConv3d(channels, channels, 3)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class DownBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride, cfg: VQGANConfig):
        super().__init__()
        self.down = SamePadConv3d(cin, cout, 4, stride=stride, padding_type=cfg.padding_type)
        self.res = ResBlock(cout, norm_factory(cfg))

    def forward(self, x):
        return self.res(self.down(x))


class UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride, cfg: VQGANConfig):
        super().__init__()
        self.up = SamePadConvTranspose3d(cin, cout, 4, stride=stride)
        self.res1 = ResBlock(cout, norm_factory(cfg))
        self.res2 = ResBlock(cout, norm_factory(cfg))

    def forward(self, x):
        return self.res2(self.res1(self.up(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        nh = cfg.n_hiddens
        self.conv_first = SamePadConv3d(cfg.image_channels, nh, 3, padding_type=cfg.padding_type)
        self.conv_blocks = nn.ModuleList(DownBlock(nh * 2 ** i, nh * 2 ** (i + 1), stride, cfg)
                                         for i, stride in enumerate(cfg.block_strides()))
        self.out_channels = nh * 2 ** cfg.n_blocks
        self.final_block = nn.Sequential(norm_factory(cfg)(self.out_channels), nn.SiLU())

    def forward(self, x):
        h = self.conv_first(x)
        for block in self.conv_blocks:
            h = block(h)
        return self.final_block(h)


class Decoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        nh, n = cfg.n_hiddens, cfg.n_blocks
        # TATS calls the input normalisation "final_block"; the name is kept so checkpoints load.
        self.final_block = nn.Sequential(norm_factory(cfg)(nh * 2 ** n), nn.SiLU())
        widths = [nh * 2 ** n] + [nh * 2 ** (n - i) for i in range(n)]  # 4x8x8, nh 32: 256, 256, 128, 64
        self.conv_blocks = nn.ModuleList(UpBlock(widths[i], widths[i + 1], stride, cfg)
                                         for i, stride in enumerate(cfg.block_strides()))
        self.conv_last = SamePadConv3d(widths[-1], cfg.image_channels, 3)

    def forward(self, x):
        h = self.final_block(x)
        for block in self.conv_blocks:
            h = block(h)
        return self.conv_last(h)


class Codebook(nn.Module):
    """Nearest-neighbour vector quantiser whose entries are EMA means of the vectors assigned to them.

    Buffers (TATS names): ``embeddings`` [n_codes, D], ``N`` (EMA of assignment counts) and ``z_avg``
    (EMA of assigned vector sums); the entry is z_avg / N. No gradient reaches it, so it has no parameters.
    """

    def __init__(self, n_codes: int, dim: int, restart_thres: float = 1.0, random_restart: bool = True):
        super().__init__()
        self.n_codes, self.dim = n_codes, dim
        self.restart_thres, self.random_restart = restart_thres, random_restart
        self.register_buffer("embeddings", torch.randn(n_codes, dim))
        self.register_buffer("N", torch.zeros(n_codes))
        self.register_buffer("z_avg", self.embeddings.clone())
        # A fresh codebook is set from the first training batch; a loaded one is kept as it is.
        self.initialized = False

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.initialized = True

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the closest entry (squared L2) for each row of ``flat`` [M, D], computed in slices."""
        table = self.embeddings
        sq_norms = (table * table).sum(1)
        rows = max(1, _DISTANCE_ELEMENTS // self.n_codes)
        # |z|^2 is the same for every entry of a row, so it does not change the argmin and is left out.
        return torch.cat([(sq_norms - 2 * part @ table.t()).argmin(1) for part in flat.split(rows)])

    def random_rows(self, flat: torch.Tensor) -> torch.Tensor:
        """``n_codes`` rows drawn from ``flat``; with fewer rows than codes, repeats get a little noise."""
        if len(flat) >= self.n_codes:
            rows = flat[torch.randperm(len(flat), device=flat.device)[: self.n_codes]]
        else:
            rows = flat[torch.randint(len(flat), (self.n_codes,), device=flat.device)]
            rows = rows + torch.randn_like(rows) * (0.01 / math.sqrt(self.dim))
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(rows, 0)  # every rank must restart codes to the same vectors
        return rows

    @torch.no_grad()
    def init_from(self, flat: torch.Tensor) -> None:
        """Data-dependent start: every entry a random encoder output, so none starts far from the data."""
        rows = self.random_rows(flat)
        self.embeddings.copy_(rows)
        self.z_avg.copy_(rows)
        self.N.fill_(1.0)
        self.initialized = True

    @torch.no_grad()
    def update(self, flat: torch.Tensor, idx: torch.Tensor) -> None:
        """One EMA step from the vectors ``flat`` [M, D] assigned to ``idx`` [M], then dead-code restarts."""
        counts = torch.bincount(idx, minlength=self.n_codes).to(flat.dtype)
        sums = torch.zeros_like(self.z_avg).index_add_(0, idx, flat)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.N.mul_(EMA_DECAY).add_(counts, alpha=1 - EMA_DECAY)
        self.z_avg.mul_(EMA_DECAY).add_(sums, alpha=1 - EMA_DECAY)
        # Laplace smoothing: never-used codes get a tiny count instead of a division by zero.
        total = self.N.sum()
        smoothed = (self.N + 1e-7) / (total + self.n_codes * 1e-7) * total
        self.embeddings.copy_(self.z_avg / smoothed[:, None])
        dead = self.N < self.restart_thres
        if self.random_restart and dead.any():
            self.embeddings[dead] = self.random_rows(flat)[dead]

    def forward(self, z: torch.Tensor) -> dict:
        """Quantise z [B, D, T, H, W]; in training mode also update the codebook (after the lookup, as TATS)."""
        b, _, t, h, w = z.shape
        flat = rearrange(z, "b d t h w -> (b t h w) d")
        if self.training and not self.initialized:
            self.init_from(flat.detach())
        idx = self.nearest(flat.detach())
        quantized = rearrange(F.embedding(idx, self.embeddings), "(b t h w) d -> b d t h w", b=b, t=t, h=h)
        commitment = COMMITMENT * F.mse_loss(z, quantized)
        if self.training:
            self.update(flat.detach(), idx)
        probs = torch.bincount(idx, minlength=self.n_codes).float() / len(idx)
        perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
        return {"embeddings": z + (quantized - z).detach(),  # straight-through: decoder gradients reach z
                "encodings": idx.view(b, t, h, w), "commitment_loss": commitment, "perplexity": perplexity}


class VQGAN(nn.Module):
    """Encoder + codebook + decoder. Video pixels are in [-0.5, 0.5]; decoded videos are not clamped."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        width = self.encoder.out_channels
        self.pre_vq_conv = SamePadConv3d(width, cfg.embedding_dim, 1, padding_type=cfg.padding_type)
        self.post_vq_conv = SamePadConv3d(cfg.embedding_dim, width, 1)
        self.codebook = Codebook(cfg.n_codes, cfg.embedding_dim, cfg.restart_thres, not cfg.no_random_restart)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        return tuple(s // d for s, d in zip((frames, height, width), self.cfg.downsample))

    def _check_video(self, video: torch.Tensor) -> None:
        if video.dim() != 5 or video.shape[1] != self.cfg.image_channels:
            raise ValueError(f"video must be [B, {self.cfg.image_channels}, T, H, W], got {list(video.shape)}")
        if any(s % d for s, d in zip(video.shape[2:], self.cfg.downsample)):
            raise ValueError(f"video T, H, W {list(video.shape[2:])} must be multiples of the tokenizer's "
                             f"downsample factors {list(self.cfg.downsample)}")

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """[B, C, T, H, W] in [-0.5, 0.5] -> long codes [B, T/dt, H/dh, W/dw]. Never updates the codebook."""
        self._check_video(video)
        z = self.pre_vq_conv(self.encoder(video))
        return self.codebook.nearest(rearrange(z, "b d t h w -> (b t h w) d")).view(z.shape[0], *z.shape[2:])

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Long codes [B, T', H', W'] -> video [B, C, T, H, W] (unclamped; callers clamp to [-0.5, 0.5])."""
        z = rearrange(F.embedding(codes, self.codebook.embeddings), "b t h w d -> b d t h w")
        return self.decoder(self.post_vq_conv(z))

    def forward(self, video: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Training pass: reconstruction and {'recon_loss' (L1), 'commitment_loss', 'perplexity'}."""
        self._check_video(video)
        vq = self.codebook(self.pre_vq_conv(self.encoder(video)))
        recon = self.decoder(self.post_vq_conv(vq["embeddings"]))
        return recon, {"recon_loss": F.l1_loss(recon, video), "commitment_loss": vq["commitment_loss"],
                       "perplexity": vq["perplexity"]}

    # Chunking along time bounds activation memory for long videos. It is NOT equivalent to encoding the
    # whole video: the convolutions see across a chunk border in the whole video but pad by replication at
    # it in a chunk, so codes (and decoded frames) near the borders can differ. What holds exactly is that
    # each chunk is tokenized as if it were a video of its own, which is also what training saw.

    def _chunk_length(self, max_frames: int) -> int:
        dt = self.cfg.downsample[0]
        if max_frames < dt:
            raise ValueError(f"max_frames must be at least the temporal downsample factor {dt}, got {max_frames}")
        return max_frames // dt * dt

    def encode_chunked(self, video: torch.Tensor, max_frames: int) -> torch.Tensor:
        """``encode`` over consecutive time chunks of at most ``max_frames`` frames (a multiple of dt)."""
        self._check_video(video)
        step = self._chunk_length(max_frames)
        return torch.cat([self.encode(video[:, :, s: s + step]) for s in range(0, video.shape[2], step)], dim=1)

    def decode_chunked(self, codes: torch.Tensor, max_frames: int) -> torch.Tensor:
        """``decode`` over consecutive chunks of codes covering at most ``max_frames`` output frames."""
        step = self._chunk_length(max_frames) // self.cfg.downsample[0]
        return torch.cat([self.decode(codes[:, s: s + step]) for s in range(0, codes.shape[1], step)], dim=2)
