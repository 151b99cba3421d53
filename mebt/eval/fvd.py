"""Frechet Video Distance, Kernel Video Distance and sliding windows, computed from I3D features.

FVD fits a Gaussian to each feature set (``mebt.eval.i3d.i3d_features``: [N, 400] Kinetics-400 logits) and
takes their Frechet distance |mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)). Published numbers were
made with two slightly different recipes, so every number must be recorded with its protocol
(``PROTOCOLS``):

- ``"float64"`` (StyleGAN-V): float64, biased covariance (1/N), trace of ``scipy.linalg.sqrtm(S_g S_r)``.
- ``"tats"`` (TATS and MeBT papers): float32, unbiased covariance (1/(N-1)), the TF-GAN trace of the
  square root: Tr sqrt(sqrt(S_g) S_r sqrt(S_g)), both roots by SVD, singular values below 1e-10 left
  un-rooted exactly as TF-GAN does.

The two agree to a few decimals on full-rank statistics; a real difference comes from the covariance
normalisation (1/N vs 1/(N-1)), which scales with 1/N. KVD is the unbiased polynomial-kernel MMD^2.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from mebt.errors import UserError

log = logging.getLogger(__name__)

_FEATURE = "I3D Kinetics-400 logits (400-d, mean over time), inputs resized to 224x224 in [-1, 1]"
PROTOCOLS = {
    "float64": {
        "feature": _FEATURE,
        "covariance": "biased (1/N)",
        "precision": "float64",
        "sqrt": "scipy.linalg.sqrtm(S_fake @ S_real), real part; retried with 1e-6 on the diagonals if not finite",
        "as_in": "StyleGAN-V",
    },
    "tats": {
        "feature": _FEATURE,
        "covariance": "unbiased (1/(N-1))",
        "precision": "float32",
        "sqrt": "TF-GAN trace_sqrt_product: Tr sqrt(sqrt(S_fake) S_real sqrt(S_fake)) by SVD, eps 1e-10",
        "as_in": "TATS / MeBT papers",
    },
}
KVD_PROTOCOL = {"feature": _FEATURE, "kernel": "polynomial (gamma <x, y> + coef0)^degree, degree 3, "
                "gamma 1/dim, coef0 1", "estimator": "unbiased MMD^2 over the full sets", "precision": "float64"}


class FVDError(UserError):
    """Feature sets or videos that FVD/KVD cannot be computed from."""


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise FVDError(f"unknown FVD protocol {protocol!r}; choose one of {', '.join(map(repr, PROTOCOLS))}")


def _check_features(real, fake) -> tuple[np.ndarray, np.ndarray]:
    real, fake = np.asarray(real), np.asarray(fake)
    for name, f in (("real", real), ("fake", fake)):
        if f.ndim != 2 or f.shape[0] < 2:
            raise FVDError(f"{name} features must be [N, dim] with N >= 2, got shape {list(f.shape)}")
        if not np.isfinite(f).all():
            raise FVDError(f"{name} features contain NaN or infinite values")
    if real.shape[1] != fake.shape[1]:
        raise FVDError(f"real and fake features differ in size: {real.shape[1]} vs {fake.shape[1]}")
    return real, fake


def gaussian_stats(features, unbiased: bool, dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """Mean [dim] and covariance [dim, dim] of features [N, dim], computed in ``dtype``.

    Centred before the product (what TATS does; StyleGAN-V accumulates E[xx^T] - mu mu^T in float64,
    which differs only by float rounding).
    """
    x = np.asarray(features).astype(dtype)
    mu = x.mean(axis=0)
    centred = x - mu
    sigma = centred.T @ centred / dtype(len(x) - (1 if unbiased else 0))
    return mu, sigma


def _trace_sqrt_float64(s1: np.ndarray, s2: np.ndarray) -> float:
    """Tr (s1 s2)^(1/2) by scipy.linalg.sqrtm, as StyleGAN-V computes it.

    Why sqrtm and not an eigen-decomposition of the symmetric form: it is the exact computation behind
    the published float64 numbers, so ours match them to the last digits, and it is exact on analytic
    cases. The product s1 s2 is not symmetric; when it is singular sqrtm may return non-finite values:
    then, as the common FID code does, a tiny multiple of the identity is added to both covariances.
    A real PSD product has a real root: the imaginary part is float noise and is dropped.
    """
    import scipy.linalg  # only this protocol needs SciPy

    root = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(root).all():
        log.warning("FVD: product of covariances is singular; adding 1e-6 to their diagonals")
        offset = np.eye(len(s1)) * 1e-6
        root = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    trace = np.trace(root)
    if abs(np.imag(trace)) > 1e-3 * max(1.0, abs(np.real(trace))):
        log.warning("FVD: matrix square root has a large imaginary part %.3g; using its real part", np.imag(trace))
    return float(np.real(trace))


def _symmetric_sqrt_tfgan(mat: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """TF-GAN's square root of a symmetric PSD matrix by SVD; singular values < eps are kept, not rooted."""
    u, s, vh = torch.linalg.svd(mat)
    s = torch.where(s < eps, s, torch.sqrt(s))
    return u @ torch.diag(s) @ vh


def _trace_sqrt_tats(s1: np.ndarray, s2: np.ndarray) -> torch.Tensor:
    """Tr (s1 s2)^(1/2) in float32 as TF-GAN/TATS: Tr sqrt(A s2 A) with A = sqrt(s1) (similar matrices).

    Rooting the symmetric product sqrt(s1) s2 sqrt(s1) instead of s1 s2 keeps everything symmetric, which
    is what lets float32 work at all; it is what the TATS/MeBT numbers were produced with.
    """
    a = _symmetric_sqrt_tfgan(torch.as_tensor(s1, dtype=torch.float32))
    product = a @ (torch.as_tensor(s2, dtype=torch.float32) @ a)
    return torch.trace(_symmetric_sqrt_tfgan(product))  # a float32 scalar tensor


def frechet_distance(mu1, s1, mu2, s2, protocol: str = "float64") -> float:
    """|mu1 - mu2|^2 + Tr(s1 + s2 - 2 (s1 s2)^(1/2)) of two Gaussians, by ``protocol`` (see PROTOCOLS)."""
    _check_protocol(protocol)
    dtype = np.float64 if protocol == "float64" else np.float32
    mu1, mu2, s1, s2 = (np.asarray(a, dtype=dtype) for a in (mu1, mu2, s1, s2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise FVDError(f"Gaussian statistics do not match: means {list(mu1.shape)}, {list(mu2.shape)}, "
                       f"covariances {list(s1.shape)}, {list(s2.shape)}")
    mean_term = np.square(mu1 - mu2).sum()
    if protocol == "float64":
        return float(mean_term + np.trace(s1) + np.trace(s2) - 2.0 * _trace_sqrt_float64(s1, s2))
    # TATS: every term in float32 (torch), the sum too.
    trace_term = torch.trace(torch.as_tensor(s1 + s2)) - 2.0 * _trace_sqrt_tats(s1, s2)
    return float(torch.as_tensor(mean_term) + trace_term)


def fvd(real_features, fake_features, protocol: str = "float64") -> float:
    """FVD between real and generated I3D features [N, dim], by ``protocol`` ("float64" or "tats")."""
    _check_protocol(protocol)
    real, fake = _check_features(real_features, fake_features)
    # Each protocol's own covariance normalisation and precision (StyleGAN-V: 1/N, float64; TATS: 1/(N-1), float32).
    unbiased, dtype = (False, np.float64) if protocol == "float64" else (True, np.float32)
    mu_r, s_r = gaussian_stats(real, unbiased, dtype)
    mu_f, s_f = gaussian_stats(fake, unbiased, dtype)
    # Fake first, as both reference implementations order it (only float rounding depends on it).
    return frechet_distance(mu_f, s_f, mu_r, s_r, protocol)


def kvd(real_features, fake_features, degree: int = 3, gamma: float | None = None, coef0: float = 1.0) -> float:
    """Unbiased MMD^2 with the polynomial kernel k(x, y) = (gamma <x, y> + coef0)^degree over the full sets.

    gamma defaults to 1/dim (1/400 for I3D). Unbiased: the k(x_i, x_i) diagonals are left out of the
    within-set means, so identical distributions give 0 in expectation (a single estimate may be < 0).
    """
    x, y = (a.astype(np.float64) for a in _check_features(real_features, fake_features))
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    m, n = len(x), len(y)
    k_xx = (gamma * x @ x.T + coef0) ** degree
    k_yy = (gamma * y @ y.T + coef0) ** degree
    k_xy = (gamma * x @ y.T + coef0) ** degree
    within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    within_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * k_xy.mean())


def sliding_windows(videos, window: int = 16, stride: int = 8):
    """Videos [B, T, ...] -> every ``window``-frame clip starting each ``stride`` frames: [B * n, window, ...].

    n = (T - window) // stride + 1 (trailing frames that do not fill a window are dropped); clips of one
    video are consecutive. Works on torch tensors and numpy arrays (uint8 [B, T, H, W, C] for I3D).
    """
    if window < 1 or stride < 1:
        raise FVDError(f"sliding window size and stride must be positive, got window={window}, stride={stride}")
    if videos.ndim < 2 or videos.shape[1] < window:
        raise FVDError(f"sliding windows of {window} frames need videos [B, T, ...] with T >= {window}, "
                       f"got shape {list(videos.shape)}")
    b, t = videos.shape[:2]
    starts = np.arange(0, t - window + 1, stride)
    index = starts[:, None] + np.arange(window)[None, :]  # [n, window] frame indices
    if isinstance(videos, torch.Tensor):
        index = torch.as_tensor(index, device=videos.device)
    clips = videos[:, index]  # [B, n, window, ...]
    return clips.reshape(b * len(starts), window, *videos.shape[2:])
