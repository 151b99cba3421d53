"""`mebt demo --quick`: every stage runs for real at a tiny budget, every artifact is valid (FVD with the
standard I3D and its two reference points included), a second run reuses the finished stages, and other
I3D weights re-run only the evaluation."""
import json
import math
import subprocess
import sys
from pathlib import Path

import av
import pytest
from mlflow.tracking import MlflowClient

from data_pipeline.verify import verify_dataset
from mebt.core.model_file import load_model
from tests.helpers.i3d_weights import fake_i3d

ROOT = Path(__file__).resolve().parents[2]


def demo(*args, cwd, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mebt.cli", "demo", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)


def test_quick_demo_makes_every_artifact_and_resumes(tmp_path):
    out = tmp_path / "demo"
    first = demo("--quick", "--out", out, cwd=tmp_path)   # from any working directory
    assert first.returncode == 0, first.stderr[-3000:]
    record = json.loads((out / "demo.json").read_text())
    assert list(record["stages"]) == ["videos", "tokenizer", "shards", "train", "export", "samples", "eval"]
    assert verify_dataset(out / "codes").ok and record["stages"]["shards"]["verified"] > 0
    assert record["stages"]["train"]["processes"] == 2 and (out / "mebt" / "mlflow.db").is_file()
    model = load_model(out / "mebt" / "model.pt")
    assert model.cfg.vocab_size == record["stages"]["tokenizer"]["codes"] and model.cfg.latent_shape == (4, 8, 8)
    with av.open(str(out / "demo_grid.mp4")) as video:
        frames = list(video.decode(video=0))
    # 8 frames; rows real / conditional / unconditional of 32x32 clips, 8 samples side by side.
    assert len(frames) == 8 and (frames[0].height, frames[0].width) == (3 * 32, 8 * 32)
    assert (out / "demo_grid.gif").stat().st_size > 0

    evaluation = record["stages"]["eval"]
    assert evaluation["i3d_network"]["network"] == "tfhub-i3d-kinetics-400" and evaluation["i3d"] is None
    metrics = evaluation["metrics"]
    fvd_keys = [f"{kind}{key}" for kind in ("fvd", "kvd") for key in ("", "_train_clips", "_reconstructions")]
    assert all(math.isfinite(metrics[k]) for k in fvd_keys)
    assert metrics["fvd"] > 0 and metrics["fvd_train_clips"] > 0 and metrics["fvd_reconstructions"] > 0
    assert "every frame shown 2x (8 -> 16 frames)" in evaluation["fvd"]
    assert "training clips" in first.stdout and "tokenizer reconstructions" in first.stdout
    assert metrics["heldout_loss"] > 0 and 0 <= metrics["heldout_acc1"] <= 1
    assert 0 <= metrics["code_tv"] <= 1 and 0 <= metrics["code_tv_train_clips"] <= 1
    run_id = record["stages"]["eval"]["mlflow"].split()[3]   # "logged to run ID at URI"
    client = MlflowClient(f"sqlite:///{out / 'mebt' / 'mlflow.db'}")
    for key in ("heldout_loss", "fvd", "fvd_train_clips", "fvd_reconstructions"):
        logged = client.get_metric_history(run_id, f"eval/{key}")
        assert [(m.step, m.value) for m in logged] == [(record["stages"]["export"]["step"], pytest.approx(metrics[key]))]
    assert "MLflow UI: mlflow ui --backend-store-uri sqlite:///" in first.stdout

    i3d = fake_i3d(tmp_path / "i3d.pt")
    second = demo("--quick", "--out", out, "--i3d", i3d, cwd=tmp_path, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stderr.count("done before") == 6 and "[eval] ..." in second.stderr   # log records
    evaluation = json.loads((out / "demo.json").read_text())["stages"]["eval"]
    assert evaluation["i3d"] == str(i3d) and evaluation["i3d_network"]["network"].startswith("sha256:")
    assert all(math.isfinite(evaluation["metrics"][k]) for k in fvd_keys)
    assert evaluation["metrics"]["fvd"] != metrics["fvd"]   # another network, other numbers

    third = demo("--quick", "--out", out, "--i3d", i3d, cwd=tmp_path, timeout=300)
    assert third.returncode == 0 and third.stderr.count("done before") == 7, third.stderr[-3000:]
    other = demo("--out", out, cwd=tmp_path, timeout=300)
    assert other.returncode == 2 and "other settings" in other.stderr.strip().splitlines()[-1]
