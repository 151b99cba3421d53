"""`mebt demo --quick`: every stage runs for real at a tiny budget, every artifact is valid, and a second run
reuses the finished stages."""
import json
import subprocess
import sys
from pathlib import Path

import av

from data_pipeline.verify import verify_dataset
from mebt.checkpoint import load_model

ROOT = Path(__file__).resolve().parents[1]


def test_quick_demo_makes_every_artifact_and_resumes(tmp_path):
    out = tmp_path / "demo"
    first = subprocess.run([sys.executable, "-m", "mebt.cli", "demo", "--quick", "--out", str(out)],
                           capture_output=True, text=True, timeout=900, cwd=tmp_path)   # any working directory
    assert first.returncode == 0, first.stderr[-3000:]
    record = json.loads((out / "demo.json").read_text())
    assert list(record["stages"]) == ["videos", "tokenizer", "shards", "train", "export", "samples", "eval"]
    assert verify_dataset(out / "codes").ok and record["stages"]["shards"]["verified"] > 0
    assert record["stages"]["train"]["processes"] == 2 and (out / "mebt" / "mlflow.db").is_file()
    model = load_model(out / "mebt" / "model.pt")
    assert model.cfg.vocab_size == 512 and model.cfg.latent_shape == (4, 8, 8)
    with av.open(str(out / "demo_grid.mp4")) as video:
        frames = list(video.decode(video=0))
    # 8 frames; rows real / conditional / unconditional of 32x32 clips, 8 samples side by side.
    assert len(frames) == 8 and (frames[0].height, frames[0].width) == (3 * 32, 8 * 32)
    assert (out / "demo_grid.gif").stat().st_size > 0 and "no I3D weights" in record["stages"]["eval"]["note"]
    assert "MLflow UI: mlflow ui --backend-store-uri sqlite:///" in first.stdout
    second = subprocess.run([sys.executable, "-m", "mebt.cli", "demo", "--quick", "--out", str(out)],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("done before") == 7
    other = subprocess.run([sys.executable, "-m", "mebt.cli", "demo", "--out", str(out)], capture_output=True,
                           text=True, timeout=300, cwd=tmp_path)
    assert other.returncode == 2 and "other settings" in other.stderr.strip().splitlines()[-1]
