"""`mebt demo --quick`: every stage runs for real at a tiny budget, every artifact is valid, a second run
reuses the finished stages, and giving I3D weights later re-runs only the evaluation, now with FVD."""
import json
import math
import subprocess
import sys
from pathlib import Path

import av
from mlflow.tracking import MlflowClient

from data_pipeline.verify import verify_dataset
from mebt.checkpoint import load_model
from tests.i3d_weights import fake_i3d

ROOT = Path(__file__).resolve().parents[1]


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
    assert "no I3D weights" in evaluation["note"] and "fvd" not in evaluation["metrics"]
    metrics = evaluation["metrics"]
    assert metrics["heldout_loss"] > 0 and 0 <= metrics["heldout_acc1"] <= 1
    assert 0 <= metrics["code_tv"] <= 1 and 0 <= metrics["code_tv_train_clips"] <= 1
    run_id = record["stages"]["eval"]["mlflow"].split()[-1]
    client = MlflowClient(f"sqlite:///{out / 'mebt' / 'mlflow.db'}")
    logged = client.get_metric_history(run_id, "eval/heldout_loss")
    assert [(m.step, round(m.value, 4)) for m in logged] == [(record["stages"]["export"]["step"],
                                                              metrics["heldout_loss"])]
    assert "MLflow UI: mlflow ui --backend-store-uri sqlite:///" in first.stdout

    i3d = fake_i3d(tmp_path / "i3d.pt")
    second = demo("--quick", "--out", out, "--i3d", i3d, cwd=tmp_path, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("done before") == 6 and "[eval] ..." in second.stdout
    evaluation = json.loads((out / "demo.json").read_text())["stages"]["eval"]
    assert "note" not in evaluation and evaluation["i3d"] == str(i3d)
    assert all(math.isfinite(evaluation["metrics"][k]) for k in ("fvd", "kvd", "fvd_train_clips", "kvd_train_clips"))
    assert evaluation["metrics"]["fvd"] > 0 and evaluation["metrics"]["fvd_train_clips"] > 0
    assert "repeated 2x" in evaluation["fvd"]

    third = demo("--quick", "--out", out, "--i3d", i3d, cwd=tmp_path, timeout=300)
    assert third.returncode == 0 and third.stdout.count("done before") == 7, third.stderr[-3000:]
    other = demo("--out", out, cwd=tmp_path, timeout=300)
    assert other.returncode == 2 and "other settings" in other.stderr.strip().splitlines()[-1]
