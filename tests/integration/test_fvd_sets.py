"""`mebt fvd REAL FAKE`: real mp4 files against .npy arrays with the standard I3D; features, record, errors."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.video import read_clip
from mebt.eval.fvd import fvd, kvd

ROOT = Path(__file__).resolve().parents[2]


def mebt_fvd(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mebt.cli", "fvd", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


def last_line(done) -> str:
    return done.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def sets(real_videos, tmp_path_factory):
    """REAL: the four real mp4 files (different sizes); FAKE: four .npy arrays, noise-corrupted clips."""
    root = tmp_path_factory.mktemp("fvd_sets")
    (root / "real").mkdir()
    for path in real_videos.values():
        (root / "real" / path.name).symlink_to(path)
    (root / "fake").mkdir()
    rng = np.random.default_rng(0)
    for i, path in enumerate(sorted(real_videos.values())):
        clip = read_clip(path, 10, 20)[0][:, ::4, ::4]   # 20 frames at a quarter of the size
        noisy = np.clip(clip.astype(int) + rng.integers(-60, 60, clip.shape), 0, 255).astype(np.uint8)
        np.save(root / "fake" / f"{i:02d}.npy", noisy)
    return root


def test_fvd_of_two_folders_with_features_and_record(sets, tmp_path):
    done = mebt_fvd(sets / "real", sets / "fake", "--frames", 16, "--json", tmp_path / "r.json", "--features-out",
                    tmp_path / "feats")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "r.json").read_text())
    real, fake = (np.load(tmp_path / "feats" / f"{n}.npy") for n in ("real", "fake"))
    assert real.shape == fake.shape == (4, 400) and real.dtype == fake.dtype == np.float32
    # The printed numbers are the FVD/KVD of exactly these features (float64 protocol, the default).
    assert result["metrics"]["fvd16"] == pytest.approx(fvd(real, fake), rel=1e-5)
    assert result["metrics"]["kvd16"] == pytest.approx(kvd(real, fake), rel=1e-5)
    assert result["metrics"]["fvd16"] > 0 and json.loads(done.stdout[:done.stdout.rindex("}") + 1]) == result["metrics"]
    p = result["protocol"]
    assert p["i3d"]["network"] == "tfhub-i3d-kinetics-400" and p["i3d"]["numerics"] == "tf"
    assert (p["real"], p["generated_per_run"], p["runs"], p["frames"]) == (4, 4, 1, 16)
    assert p["real_sizes"] == ["144x176", "272x640", "720x1280"] and "180x320" in p["fake_sizes"]
    # Features follow sorted file names: the second FAKE file's features are fake[1].
    from mebt.eval.i3d import i3d_features
    from mebt.eval.i3d_weights import load_i3d

    second = np.load(sets / "fake" / "01.npy")[None, :16]
    assert np.allclose(i3d_features(load_i3d(), second)[0], fake[1], atol=1e-4)


def test_tats_protocol_and_runs(sets, tmp_path):
    done = mebt_fvd(sets / "real", sets / "fake", "--frames", 16, "--protocol", "tats", "--runs", 2, "--json",
                    tmp_path / "r.json")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "r.json").read_text())
    assert set(result["metrics"]) == {"fvd16", "fvd16_std", "kvd16", "kvd16_std"}
    assert len(result["runs"]["fvd16"]) == 2 and result["protocol"]["i3d"]["numerics"] == "tats"


def test_bad_sets_are_one_line_errors(sets, tmp_path):
    good, bad = tmp_path / "good", tmp_path / "bad"
    for folder in (good, bad):
        folder.mkdir()
        for name in ("a.npy", "b.npy"):
            np.save(folder / name, np.zeros((16, 8, 8, 3), np.uint8))
    np.save(bad / "c.npy", np.zeros((17, 8, 9, 3), np.uint8))
    done = mebt_fvd(good, bad)
    assert done.returncode == 2 and "mixed shapes: " in last_line(done) and "c.npy' has 17 frames" in last_line(done)
    assert "--frames F" in last_line(done)
    np.save(bad / "c.npy", np.zeros((6, 8, 8, 3), np.uint8))
    done = mebt_fvd(good, bad, "--frames", 16)
    assert done.returncode == 2 and "c.npy' has 6 frames; I3D needs at least 16" in last_line(done)
    np.save(bad / "c.npy", np.zeros((16, 8, 8, 3), np.float32))
    done = mebt_fvd(good, bad)
    assert done.returncode == 2 and "expected uint8 [T, H, W, 3]" in last_line(done)
    (bad / "c.npy").unlink()
    (bad / "c.mp4").write_bytes(b"not a video")
    done = mebt_fvd(good, bad)
    assert done.returncode == 2 and "c.mp4" in last_line(done) and "not a decodable video" in last_line(done)
    done = mebt_fvd(sets / "real", good)   # long REAL videos of unequal lengths without --frames
    assert done.returncode == 2 and "mixed shapes" in last_line(done) and "--frames F" in last_line(done)
    done = mebt_fvd(sets / "fake", sets / "fake", "--frames", 8)
    assert done.returncode == 2 and "--frames 8 is too few: I3D needs at least 9" in last_line(done)
    done = mebt_fvd(sets / "real", sets / "fake", "--protocol", "mebt_16f", "--frames", 16)
    assert done.returncode == 2 and "needs 2048 REAL videos, found 4" in last_line(done)
    done = mebt_fvd(tmp_path / "nowhere", sets / "fake")
    assert done.returncode == 2 and "is not a folder" in last_line(done)
