"""The README's quick path, run as written: a folder of videos of two sizes with a stray .gif, a corrupt and
a too-short video -> tokenizer -> shards -> two runs with no model keys -> `mebt runs compare` with no
tracking flags -> `mebt eval --no-fvd`. What a new user sees is asserted, not only the exit code."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from data_pipeline.synthetic_videos import SynthConfig, render_video
from mebt.media import write_gif, write_mp4

ROOT = Path(__file__).resolve().parents[2]
BAR = re.compile(r"\[\d+:\d+(:\d+)?[,<\]]")   # a tqdm bar's elapsed-time bracket


def quick_path_block() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("<!-- first-hour:begin -->")[1].split("<!-- first-hour:end -->")[0]
    return section.split("```bash\n")[1].split("```")[0]


def my_videos(folder: Path) -> None:
    """12 usable videos of 24 frames (6 at 64x48, 6 at 40x40), a .gif preview, a corrupt and a 4-frame mp4."""
    folder.mkdir()
    wide, small = SynthConfig(frames=24, resolution=64, palette=6), SynthConfig(frames=24, resolution=40, palette=6)
    for i in range(6):
        write_mp4(render_video(i, wide)[:, 8:56], folder / f"wide_{i}.mp4")
        write_mp4(render_video(100 + i, small), folder / f"small_{i}.mp4")
    write_gif(render_video(50, small), folder / "preview.gif")
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    write_mp4(render_video(60, wide)[:4], folder / "too_short.mp4")


def test_the_readme_quick_path_works_as_written(tmp_path):
    my_videos(tmp_path / "my_videos")
    bin_dir = Path(sys.executable).parent   # the environment's `mebt` console script lives next to its python
    assert shutil.which("mebt", path=str(bin_dir)), f"no mebt console script in {bin_dir}: install with pip -e ."
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MEBT_"))}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", quick_path_block()], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    err = done.stderr.replace("\r", "\n")

    # What reached the terminal is mebt's own log lines and progress bars: no third-party warning, no traceback.
    foreign = [line for line in err.splitlines() if line.strip() and not line.startswith("[rank ")
               and not BAR.search(line)]
    assert foreign == [], foreign[:10]
    warnings = [line.split("WARNING] ", 1)[1] for line in err.splitlines() if " WARNING] " in line]
    assert any("has no train.txt/test.txt" in w and "so train and test overlap" in w for w in warnings)
    assert any("my_videos/broken.mp4" in w and "not a decodable video" in w for w in warnings)
    assert any("my_videos/too_short.mp4': 4 frames, a clip needs 8" in w for w in warnings)
    assert not any("preview.gif" in w for w in warnings)   # not a video to this scan at all

    # The dataset: 12 videos x 5 clips (24 frames, 8-frame clips every 4 frames), the gif not listed.
    info = json.loads((tmp_path / "data/my_codes/dataset.json").read_text())
    assert info["counts"]["videos_listed"] == 14 and info["counts"]["videos"] == 12
    assert info["counts"]["clips"] == 60 and info["grid"] == [4, 8, 8] and info["codebook_size"] == 512
    assert sorted(v["why"] for v in info["skipped_videos"]) == ["too short for 8 frames", "unreadable"]
    assert "data/my_codes: 1 shards, 60 samples checked: OK" in done.stdout

    # Two runs with no model keys: the shape and the tokenizer came from the dataset; samples were decoded.
    tokenizer = str((tmp_path / "runs/tokenizer/tokenizer.ckpt").resolve())
    for name in ("lr2e-3", "lr5e-4"):
        config = yaml.safe_load((tmp_path / "runs" / name / "config.yaml").read_text())
        assert config["model"]["latent_shape"] == [4, 8, 8] and config["model"]["vocab_size"] == 512
        assert config["train"]["tokenizer"] == tokenizer
        assert (tmp_path / "runs" / name / "samples" / "step_00000150.mp4").is_file()
        assert json.loads((tmp_path / "runs" / name / "mlflow.json").read_text())["tracking_uri"] == \
            f"sqlite:///{tmp_path / 'mlflow.db'}"
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"step"')]
    assert [r["run_dir"] for r in results] == ["runs/lr2e-3", "runs/lr5e-4"]

    # One store in the project folder holds both runs, named after their run dirs, with the training's times.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "mlflow.db", "mlruns", "my_videos", "runs"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mebt-tiny")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert sorted(runs) == ["lr2e-3", "lr5e-4"]
    for r in runs.values():
        first = min(m.timestamp for m in client.get_metric_history(r.info.run_id, "train/loss"))
        assert r.info.start_time < first <= r.info.end_time and r.info.status == "FINISHED"

    # `mebt runs compare` with no flags: a row per run, the lr that differs, best and last values.
    table = done.stdout[done.stdout.index("run "):]
    header, _, *rows = table.splitlines()[:4]
    assert header.split()[:4] == ["run", "run_id", "status", "optim.lr"]
    assert sorted(row.split()[0] for row in rows) == ["lr2e-3", "lr5e-4"]
    assert {row.split()[0]: row.split()[3] for row in rows} == {"lr2e-3": "0.002", "lr5e-4": "0.0005"}
    assert "train/loss best" in header and "train/acc1 last" in header

    # `mebt eval --no-fvd`: the I3D-free metrics, with the run's sampling section, logged into the run.
    report = json.loads((tmp_path / "runs/lr2e-3/eval/global_step150/report.json").read_text())
    assert set(report["metrics"]) == {"heldout_loss", "heldout_acc1", "code_tv", "code_tv_vs_train",
                                      "code_tv_train_clips"}
    assert report["sampling_from"] == "the run's config" and report["note"] == "FVD/KVD skipped: --no-fvd"
    run_id = runs["lr2e-3"].info.run_id
    assert report["mlflow"] == f"logged to run {run_id} at sqlite:///{tmp_path / 'mlflow.db'}"
    logged = client.get_metric_history(run_id, "eval/heldout_loss")
    assert [(m.step, m.value) for m in logged] == [(150, report["metrics"]["heldout_loss"])]
