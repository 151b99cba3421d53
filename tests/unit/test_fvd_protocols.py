"""FVD protocols (counts, runs, record) and the metric variants of an evaluation, on known feature sets."""
from types import SimpleNamespace

import numpy as np
import pytest

from mebt.errors import ConfigError
from mebt.eval.fvd import fvd, kvd
from mebt.eval.protocols import PROTOCOLS, get_protocol, resolve_counts
from mebt.eval.scoring import official_starts, score, window_starts

I3D = SimpleNamespace(network={"network": "test-features", "numerics": "tf"})


def test_paper_protocols_fix_the_published_counts():
    assert resolve_counts(get_protocol("mebt_16f")) == {"num_samples": 2048, "runs": 10, "num_real": 2048}
    assert resolve_counts(get_protocol("mebt_128f")) == {"num_samples": 512, "runs": 5, "num_real": 512}
    assert resolve_counts(get_protocol("mebt_128f"), runs=5) == {"num_samples": 512, "runs": 5, "num_real": 512}
    assert resolve_counts(get_protocol("float64")) == {"num_samples": 256, "runs": 1, "num_real": 256}
    assert resolve_counts(get_protocol("tats"), num_samples=64, runs=3) == {"num_samples": 64, "runs": 3,
                                                                             "num_real": 256}
    with pytest.raises(ConfigError, match="fixes runs=5, but 2 was given.*--protocol tats"):
        resolve_counts(get_protocol("mebt_128f"), runs=2)
    with pytest.raises(ConfigError, match="unknown FVD protocol 'paper'"):
        get_protocol("paper")
    # The paper's numbers come from the TATS port and arithmetic, with truncated generated pixels.
    for name in ("tats", "mebt_16f", "mebt_128f"):
        p = PROTOCOLS[name]
        assert (p.arithmetic, p.i3d_numerics, p.pixels) == ("tats", "tats", "truncate")
    assert (PROTOCOLS["float64"].arithmetic, PROTOCOLS["float64"].i3d_numerics) == ("float64", "tf")


def test_official_sliding_starts_leave_out_the_last_window():
    assert window_starts(128) == list(range(0, 113, 8)) and len(window_starts(128)) == 15
    assert official_starts(128) == list(range(0, 112, 8)) and len(official_starts(128)) == 14
    assert window_starts(16) == [0] and official_starts(16) == []


def features(rng, n, shift=0.0, dim=6):
    return rng.normal(size=(n, dim)) + shift


@pytest.mark.parametrize("runs", [1, 3])
def test_every_variant_is_the_fvd_of_its_own_sets(runs):
    rng = np.random.default_rng(0)
    n, frames = 40, 32                       # windows at 0, 8, 16; the official score uses 0 and 8
    full = features(rng, n * runs, 0.3)
    windows = np.stack([features(rng, n * runs, 0.1 * w) for w in range(3)], axis=1)   # [N, 3, 6]
    real = {(32, False): features(rng, 50), (32, True): features(rng, 150), (16, False): features(rng, 50)}
    asked = []

    def real_of(length, pooled):
        asked.append((length, pooled))
        return real[(length, pooled)]

    report = score({"full": full, "windows": windows}, real_of, "float64", runs, I3D, frames=frames)
    m = report["metrics"]
    assert sorted(set(asked)) == sorted(real)
    split = lambda x: [x[r * n:(r + 1) * n] for r in range(runs)]   # noqa: E731
    expect = {"fvd32": [fvd(real[(32, False)], f) for f in split(full)],
              "kvd32": [kvd(real[(32, False)], f) for f in split(full)],
              "fvd16_sliding_pooled": [fvd(real[(32, True)], f.reshape(-1, 6)) for f in split(windows)],
              "fvd16_start0": [fvd(real[(16, False)], f[:, 0]) for f in split(windows)],
              "fvd16_start8": [fvd(real[(16, False)], f[:, 1]) for f in split(windows)],
              "kvd16_start8": [kvd(real[(16, False)], f[:, 1]) for f in split(windows)]}
    for key, values in expect.items():
        assert m[key] == pytest.approx(np.mean(values), rel=1e-12), key
        assert report["runs"][key] == pytest.approx(values, rel=1e-12)
        assert (f"{key}_std" in m) == (runs > 1)
        if runs > 1:
            assert m[f"{key}_std"] == pytest.approx(np.std(values), rel=1e-9)
    assert "fvd16_start16" not in m   # the last window is pooled but not scored on its own (official range)
    assert m["fvd16_sliding_mean"] == pytest.approx((m["fvd16_start0"] + m["fvd16_start8"]) / 2)
    record = report["protocol"]
    assert record["name"] == "float64" and record["i3d"] == I3D.network and record["runs"] == runs
    assert record["generated_per_run"] == n and record["frames"] == 32 and "16_start{s}" in record["variants"]


def test_sixteen_frame_samples_have_no_window_variants():
    rng = np.random.default_rng(1)
    report = score({"full": features(rng, 30)}, lambda length, pooled: features(rng, 30, 1.0), "tats", 1, I3D,
                   frames=16)
    assert set(report["metrics"]) == {"fvd16", "kvd16"} and report["metrics"]["fvd16"] > 0
    assert report["protocol"]["covariance"].startswith("unbiased")
