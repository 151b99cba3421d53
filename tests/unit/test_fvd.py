"""FVD / KVD / sliding windows against closed forms and direct reference computations."""
import numpy as np
import pytest
import torch

from mebt.eval.fvd import PROTOCOLS, FVDError, frechet_distance, fvd, gaussian_stats, kvd, sliding_windows


def rotation(d, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


def closed_form_commuting(mu1, d1, mu2, d2):
    """FD of N(mu1, R diag(d1) R^T) and N(mu2, R diag(d2) R^T): same eigenbasis, so roots multiply."""
    return np.square(mu1 - mu2).sum() + np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2)


def closed_form_2x2(mu1, s1, mu2, s2):
    """Any 2x2 case: s1 s2 has eigenvalues l1, l2 >= 0 and Tr sqrt(s1 s2) = sqrt(l1 + l2 + 2 sqrt(l1 l2))."""
    p = s1 @ s2
    tr_sqrt = np.sqrt(np.trace(p) + 2 * np.sqrt(np.linalg.det(p)))
    return np.square(mu1 - mu2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt


@pytest.mark.parametrize("protocol", ["float64", "tats"])
def test_identical_feature_sets_give_zero(protocol):
    feats = np.random.default_rng(0).normal(size=(500, 16)) * 3 + 1
    trace = np.trace(np.cov(feats, rowvar=False))
    tol = 1e-9 if protocol == "float64" else 1e-4  # float32 roots lose ~1e-6 relative per eigenvalue
    assert abs(fvd(feats, feats, protocol)) <= tol * trace


@pytest.mark.parametrize("protocol", ["float64", "tats"])
def test_exact_parameters_match_closed_forms(protocol):
    rtol = 1e-10 if protocol == "float64" else 1e-5
    d = 8
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    d1, d2 = rng.uniform(0.5, 3, size=d), rng.uniform(0.5, 3, size=d)
    # Diagonal covariances.
    got = frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2), protocol)
    assert got == pytest.approx(closed_form_commuting(mu1, d1, mu2, d2), rel=rtol)
    # The same spectra in a rotated (non-diagonal) shared basis.
    r = rotation(d, 2)
    s1, s2 = r @ np.diag(d1) @ r.T, r @ np.diag(d2) @ r.T
    assert frechet_distance(mu1, s1, mu2, s2, protocol) == pytest.approx(closed_form_commuting(mu1, d1, mu2, d2), rel=rtol)
    # Non-commuting 2x2 covariances (different eigenbases).
    a = np.array([[2.0, 0.6], [0.6, 1.0]])
    b = rotation(2, 3) @ np.diag([0.3, 4.0]) @ rotation(2, 3).T
    m1, m2 = np.array([0.5, -1.0]), np.array([1.5, 0.0])
    assert frechet_distance(m1, a, m2, b, protocol) == pytest.approx(closed_form_2x2(m1, a, m2, b), rel=rtol)
    # Equal Gaussians: 0.
    assert abs(frechet_distance(mu1, s1, mu1, s1, protocol)) < (1e-10 if protocol == "float64" else 1e-4) * d1.sum()


@pytest.mark.parametrize("protocol", ["float64", "tats"])
def test_fvd_on_large_samples_approaches_the_true_distance(protocol):
    d, n = 4, 40_000
    rng = np.random.default_rng(4)
    r = rotation(d, 5)
    d1, d2 = np.array([1.0, 2.0, 0.5, 3.0]), np.array([2.0, 0.5, 1.0, 1.0])
    mu1, mu2 = np.zeros(d), np.array([1.0, -0.5, 0.0, 0.5])
    x = mu1 + rng.normal(size=(n, d)) * np.sqrt(d1) @ r.T
    y = mu2 + rng.normal(size=(n, d)) * np.sqrt(d2) @ r.T
    truth = closed_form_commuting(mu1, d1, mu2, d2)  # 3.09...
    # Sampling error of the estimate is ~sqrt(4 dmu^T (S1 + S2) dmu / n) ~ 0.02 here.
    assert fvd(x, y, protocol) == pytest.approx(truth, abs=0.06)


def test_protocols_use_their_own_covariance_normalisation():
    x = np.random.default_rng(6).normal(size=(10, 3))
    y = x * 2.0
    assert np.allclose(gaussian_stats(x, unbiased=True)[1], np.cov(x, rowvar=False, ddof=1))
    assert np.allclose(gaussian_stats(x, unbiased=False)[1], np.cov(x, rowvar=False, ddof=0))
    # Means are equal up to scaling, so FD = Tr(S) (2 - 1)^2 with the protocol's S.
    mu = x.mean(0)
    x0, y0 = x - mu, y - 2 * mu  # centre both: FD is then the covariance term only
    assert fvd(x0, y0, "float64") == pytest.approx(np.trace(np.cov(x, rowvar=False, ddof=0)), rel=1e-9)
    assert fvd(x0, y0, "tats") == pytest.approx(np.trace(np.cov(x, rowvar=False, ddof=1)), rel=1e-5)
    assert set(PROTOCOLS) == {"float64", "tats"}
    for p in PROTOCOLS.values():
        assert {"feature", "covariance", "precision", "sqrt"} <= set(p)


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # scipy's sqrtm says so; the result is still finite
@pytest.mark.parametrize("protocol", ["float64", "tats"])
def test_singular_covariance_stays_finite(protocol):
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(20, 50)), rng.normal(size=(20, 50)) + 0.5  # rank 19 < 50
    value = fvd(x, y, protocol)
    assert np.isfinite(value) and value > 0
    # A degenerate (zero-variance) feature dimension too.
    x[:, 0] = y[:, 0] = 1.0
    assert np.isfinite(fvd(x, y, protocol))
    assert np.isfinite(frechet_distance(np.zeros(3), np.zeros((3, 3)), np.ones(3), np.zeros((3, 3)), protocol))


def test_bad_inputs_are_one_line_errors():
    x = np.zeros((10, 4))
    with pytest.raises(FVDError, match="differ in size"):
        fvd(x, np.zeros((10, 5)))
    with pytest.raises(FVDError, match="N >= 2"):
        fvd(x, np.zeros((1, 4)))
    with pytest.raises(FVDError, match="unknown FVD protocol 'tf'"):
        fvd(x, x, "tf")
    with pytest.raises(FVDError, match="NaN"):
        kvd(x, np.full((10, 4), np.nan))


def kvd_reference(x, y, degree=3, gamma=None, coef0=1.0):
    """Unbiased MMD^2 written out as the double sums of its definition."""
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    k = lambda a, b: (gamma * float(a @ b) + coef0) ** degree
    m, n = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return kxx + kyy - 2 * kxy


def test_kvd():
    rng = np.random.default_rng(8)
    x, y = rng.normal(size=(30, 6)), rng.normal(size=(25, 6)) + 0.7
    assert kvd(x, y) == pytest.approx(kvd_reference(x, y), rel=1e-10)
    assert kvd(x, y, degree=2, gamma=0.3, coef0=0.5) == pytest.approx(kvd_reference(x, y, 2, 0.3, 0.5), rel=1e-10)
    assert kvd(x, y) > 0.1
    # Identical sets: the within-set means leave out k(x_i, x_i), the cross mean keeps it, so the estimate
    # is (2 / (m - 1)) (mean of all k - mean of the diagonal): O(1/m), ~0 for large sets.
    big = rng.normal(size=(1000, 6))
    k = (big @ big.T / 6 + 1) ** 3
    assert kvd(big, big) == pytest.approx(2 / 999 * (k.mean() - np.diag(k).mean()), rel=1e-9)
    assert abs(kvd(big, big)) < 2e-3 * np.diag(k).mean()
    assert kvd(big, big + 0.7) > 50 * abs(kvd(big, big))


@pytest.mark.parametrize("as_torch", [False, True])
def test_sliding_windows(as_torch):
    videos = np.arange(2 * 40 * 3).reshape(2, 40, 3).astype(np.uint8)  # frame t of video b holds b*40+t
    if as_torch:
        videos = torch.from_numpy(videos)
    clips = sliding_windows(videos, window=16, stride=8)
    assert tuple(clips.shape) == (2 * 4, 16, 3)  # starts 0, 8, 16, 24 (frames 40..: no full window)
    assert type(clips) is type(videos)
    for b in range(2):
        for i in range(4):
            assert (np.asarray(clips[b * 4 + i]) == np.asarray(videos[b, 8 * i:8 * i + 16])).all()
    assert tuple(sliding_windows(np.zeros((3, 128, 4, 4, 3)), 16, 8).shape) == (3 * 15, 16, 4, 4, 3)
    assert tuple(sliding_windows(np.zeros((1, 16, 2)), 16, 8).shape) == (1, 16, 2)
    with pytest.raises(FVDError, match="T >= 16"):
        sliding_windows(np.zeros((1, 15, 2)))
