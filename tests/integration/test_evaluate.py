"""`mebt eval` end to end: a tiny trained run, the standard I3D or a random-weight one in its file layout,
synthetic videos: samples, FVD/KVD, protocols and runs, report, grid, MLflow metrics at the checkpoint's
step, sharding, resume and --watch."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from mebt.fsutil import file_sha256

ROOT = Path(__file__).resolve().parents[2]
GRID = (4, 4, 4)   # with a 4x4x4 tokenizer: 16 frames at 16x16, the fewest frames FVD16 takes


CODE_METRICS = {"heldout_loss", "heldout_acc1", "code_tv", "code_tv_vs_train", "code_tv_train_clips"}


def mebt_eval(*args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mebt.cli", "eval", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def scored(trained):
    """The run's last checkpoint scored once (FVD/KVD into its MLflow run): args, result and seconds."""
    args = ["--checkpoint", trained["run_dir"], "--num-samples", 6, "--batch-size", 4, "--i3d", trained["i3d"],
            "--real-dir", trained["videos"], "--real-split", "train", "--num-real", 6, "--cache-dir",
            trained["cache"]]   # no sampling keys: the run's own section (steps=2) is used
    start = time.monotonic()
    done = mebt_eval(*args)
    return args, done, time.monotonic() - start


def test_eval_scores_a_run_checkpoint_and_logs_into_its_mlflow_run(trained, scored, tmp_path):
    run_dir = trained["run_dir"]
    args, done, first_seconds = scored
    assert done.returncode == 0, done.stderr[-3000:]
    out = run_dir / "eval" / "global_step4"
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] and report["step"] == 4 and report["num_samples"] == 6
    assert set(report["metrics"]) == {"fvd16", "kvd16"} | CODE_METRICS and report["metrics"]["fvd16"] > 0
    m = report["metrics"]
    assert m["heldout_loss"] > 0 and 0 <= m["heldout_acc1"] <= 1 and report["code_metrics"] == []
    assert all(0 <= m[k] <= 1 for k in ("code_tv", "code_tv_vs_train", "code_tv_train_clips"))
    # the run trained with sampling.steps=2: its own sampling section is used when none is given
    assert report["sampling_from"] == "the run's config" and report["sampling"]["steps"] == 2
    protocol = report["protocol"]
    assert protocol["generated_per_run"] == 6 and protocol["runs"] == 1 and protocol["real"] == 6
    assert protocol["name"] == "float64" and protocol["covariance"].startswith("biased")
    assert report["mlflow"] == f"logged to run {trained['run_id']} at {trained['store']}"
    assert protocol["i3d"] == {"network": f"sha256:{file_sha256(trained['i3d'])}", "weights_sha256":
                               file_sha256(trained["i3d"]), "source": str(trained["i3d"]), "numerics": "tf",
                               "bn_eps": 1e-3}
    assert protocol["pixels"] == "round" and protocol["real_split"] == "train" and protocol["real_frame_stride"] == 1
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["batch_00000.npz", "batch_00001.npz"]
    assert sorted(p.name for p in (out / "features").rglob("*.npz")) == ["batch_00000.npz", "batch_00001.npz"]
    videos = np.concatenate([np.load(p)["video"] for p in sorted((out / "samples").iterdir())])
    assert videos.shape == (6, 16, 16, 16, 3) and videos.dtype == np.uint8
    assert all((out / name).stat().st_size > 0 for name in ("samples_grid.mp4", "samples_grid.gif"))
    client = MlflowClient(trained["store"])   # the store the run recorded, found from another working directory
    history = client.get_metric_history(trained["run_id"], "eval/fvd16")
    assert [(m.step, m.value) for m in history] == [(4, pytest.approx(report["metrics"]["fvd16"]))]
    assert {a.path for a in client.list_artifacts(trained["run_id"], "eval/global_step4")} == {
        "eval/global_step4/samples_grid.mp4", "eval/global_step4/samples_grid.gif", "eval/global_step4/report.json"}
    logged = client.download_artifacts(trained["run_id"], "eval/global_step4/report.json", str(tmp_path))
    assert json.loads(Path(logged).read_text())["protocol"] == protocol
    # Again: the samples and the real features are on disk, so nothing is sampled or recomputed and the
    # numbers repeat (an interrupted evaluation resumes the same way, batch by batch).
    stamps = {p: p.stat().st_mtime_ns for p in [*(out / "samples").iterdir(), *trained["cache"].iterdir(),
                                                 *(out / "features").rglob("*.npz")]}
    assert len(stamps) == 2 + 4 + 2   # sample batches, real features and held-out codes (+ keys), batch features
    start = time.monotonic()
    again = mebt_eval(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "report.json").read_text())["metrics"] == report["metrics"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps and len(list(trained["cache"].iterdir())) == 4
    print(f"first evaluation {first_seconds:.1f} s, repeated {time.monotonic() - start:.1f} s")


def test_runs_compare_shows_the_eval_metric_next_to_the_loss(trained, scored, tmp_path):
    assert scored[1].returncode == 0, scored[1].stderr[-3000:]   # the training run now has eval/fvd16 at step 4
    plot = tmp_path / "compare.png"
    done = subprocess.run([sys.executable, "-m", "mebt.cli", "runs", "compare", "--tracking-uri",
                           str(trained["run_dir"]), "--experiment", "mebt", "--metric", "train/loss", "--metric",
                           "eval/fvd16", "--plot", str(plot)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "eval/fvd16 best" in done.stdout and "@4" in done.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    listed = subprocess.run([sys.executable, "-m", "mebt.cli", "runs", "list", "--tracking-uri",
                             str(trained["run_dir"])], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert listed.returncode == 0 and trained["run_id"][:8] in listed.stdout, listed.stderr[-2000:]
    # No tracking flags, from the folder the training started in: its default store, named in one line.
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    for command in (["list"], ["compare", "--experiment", "mebt"]):
        here = subprocess.run([sys.executable, "-m", "mebt.cli", "runs", *command], capture_output=True, text=True,
                              cwd=trained["root"], env={**env, "PYTHONPATH": str(ROOT)}, timeout=120)
        assert here.returncode == 0 and trained["run_id"][:8] in here.stdout, here.stderr[-2000:]
        named = [line for line in here.stderr.splitlines() if "MLflow store" in line]
        assert len(named) == 1 and named[0].endswith(f"INFO] mebt.eval.runs: MLflow store {trained['store']}"), named


def test_eval_of_an_exported_model_without_real_videos_reports_the_skip(trained, tmp_path):
    model = tmp_path / "model.pt"
    assert subprocess.run([sys.executable, "-m", "mebt.cli", "export", trained["run_dir"], model],
                          capture_output=True, cwd=ROOT).returncode == 0
    done = mebt_eval("--checkpoint", model, "--tokenizer", trained["tokenizer"], "--num-samples", 3, "--preset",
                     "sky_16f", "sampling.steps=2", "sampling.n_revise=0", "sampling.revise_rounds=0")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((Path(str(model) + ".eval") / "report.json").read_text())
    assert set(report["metrics"]) == {"code_tv_vs_train"} and "no real videos" in report["note"]
    assert "pass --real-dir" in report["code_metrics"][0] and report["sampling"]["ctemp"] == 8.0
    assert report["sampling"]["revise_top_k"] is None and report["sampling"]["bootstrap_temperature"] == 1.0


def test_sharded_evaluation_gives_the_numbers_of_one_process(trained, tmp_path):
    """The standard I3D (no --i3d), 2 runs: FVD from 2 shards equals FVD from one process."""
    model = tmp_path / "model.pt"
    assert subprocess.run([sys.executable, "-m", "mebt.cli", "export", trained["run_dir"], model],
                          capture_output=True, cwd=ROOT).returncode == 0
    common = ["--checkpoint", model, "--tokenizer", trained["tokenizer"], "--num-samples", 3, "--runs", 2,
              "--batch-size", 2, "--real-dir", trained["videos"], "--real-split", "train", "--num-real", 4,
              "--cache-dir", tmp_path / "cache", "--protocol", "tats", "sampling.steps=2"]
    assert mebt_eval(*common, "--out", tmp_path / "one").returncode == 0
    second = mebt_eval(*common, "--out", tmp_path / "two", "--num-shards", 2, "--shard-index", 1)
    assert second.returncode == 0 and '"complete": false' in second.stdout, second.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "two" / "samples").iterdir()) == ["batch_00001.npz"]
    # the shard computed the I3D features of its own batch
    assert sorted(p.name for p in (tmp_path / "two" / "features").rglob("*.npz")) == ["batch_00001.npz"]
    first = mebt_eval(*common, "--out", tmp_path / "two", "--num-shards", 2, "--shard-index", 0)
    assert first.returncode == 0 and '"complete": true' in first.stdout, first.stderr[-2000:]
    for j in range(3):   # batches are seeded by their index: the same codes however the work was split
        a, b = (np.load(tmp_path / d / "samples" / f"batch_{j:05d}.npz")["codes"] for d in ("one", "two"))
        assert np.array_equal(a, b)
    one, two = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert set(one["metrics"]) == {"fvd16", "fvd16_std", "kvd16", "kvd16_std"} | CODE_METRICS
    for key, value in one["metrics"].items():
        assert abs(two["metrics"][key] - value) <= 1e-6 * abs(value), key
    assert len(one["runs"]["fvd16"]) == 2 and one["metrics"]["fvd16"] == pytest.approx(np.mean(one["runs"]["fvd16"]))
    protocol = one["protocol"]
    assert protocol["i3d"]["network"] == "tfhub-i3d-kinetics-400" and protocol["i3d"]["numerics"] == "tats"
    assert protocol["pixels"] == "truncate" and protocol["generated_per_run"] == 3 and protocol["runs"] == 2
    # the stored videos follow the protocol's pixel rule: truncated, not rounded
    batch = np.load(tmp_path / "one" / "samples" / "batch_00000.npz")
    assert str(batch["pixels"]) == "truncate"


def test_protocol_counts_are_fixed(trained):
    done = mebt_eval("--checkpoint", trained["run_dir"], "--protocol", "mebt_16f", "--num-samples", 8)
    assert done.returncode == 2
    assert "protocol 'mebt_16f' fixes num_samples=2048, but 8 was given" in done.stderr.strip().splitlines()[-1]


def watcher(args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mebt.cli", "eval", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop_watcher(proc: subprocess.Popen) -> tuple[str, str]:
    """SIGTERM once the watcher has said it is watching (its handler is installed by then); its output."""
    first = proc.stdout.readline()
    assert first.startswith("mebt eval: watching"), proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    return first + out, err


def test_watch_evaluates_each_checkpoint_once(trained, tmp_path):
    # --out: every checkpoint gets its own folder below it, and its report there marks it as done.
    base = ["--watch", trained["run_dir"], "--out", tmp_path / "watch", "--num-samples", 2, "--batch-size", 2,
            "--poll-s", 0.5, "sampling.steps=2", "--no-mlflow"]
    reports = [tmp_path / "watch" / tag / "report.json" for tag in ("global_step2", "global_step4")]
    proc = watcher(base)
    deadline = time.monotonic() + 300
    while not all(r.exists() for r in reports):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.5)
    out, _ = stop_watcher(proc)
    assert "evaluated 2 checkpoint(s)" in out
    assert [json.loads(r.read_text())["step"] for r in reports] == [2, 4]
    stamps = [r.stat().st_mtime_ns for r in reports]
    # Every checkpoint has its marker now: a new watcher only polls until it is told to stop.
    out, _ = stop_watcher(watcher(base))
    assert "evaluated 0 checkpoint(s)" in out and [r.stat().st_mtime_ns for r in reports] == stamps


def test_eval_errors_are_one_line(trained, tmp_path):
    done = mebt_eval("--checkpoint", trained["run_dir"], "--i3d", tmp_path / "i3d_pretrained_400.pt",
                     "--real-dir", trained["videos"], "--num-samples", 2)
    assert done.returncode == 2 and "i3d_pretrained_400.pt" in done.stderr.strip().splitlines()[-1]
    assert not (trained["run_dir"] / "eval" / "global_step4" / "samples" / "batch_00002.npz").exists()
    done = mebt_eval("--checkpoint", tmp_path / "nothing")
    assert done.returncode == 2 and "no mebt training checkpoint" in done.stderr.strip().splitlines()[-1]


def test_real_clips_take_the_training_clips_frame_stride(trained, tmp_path):
    from data_pipeline.manifest import write_dataset_json
    from data_pipeline.video import list_videos, read_clip
    from mebt.eval.evaluate import EvalConfig, real_clips, real_frame_stride

    cfg = EvalConfig(checkpoint="unused", real_dir=str(trained["videos"]), real_split="train", num_real=3)
    write_dataset_json(tmp_path, {"clip": {"frame_stride": 2}})
    info = {"config": {"data": {"data_dir": str(tmp_path)}}}
    assert real_frame_stride(cfg, info) == 2                        # as the training clips were cut
    assert real_frame_stride(cfg, {"config": {"data": {"data_dir": str(tmp_path / "gone")}}}) == 1
    cfg.real_frame_stride = 3
    assert real_frame_stride(cfg, info) == 3                        # --real-frame-stride wins
    clips = real_clips(cfg, 8, 24, stride=2)
    assert clips.shape == (3, 8, 24, 24, 3)
    # Every clip is frames s, s+2, ..., s+14 of one training video (24x24 videos: no resize).
    candidates = [read_clip(entry.path, s, 8, 2)[0] for entry in list_videos(trained["videos"], "train")
                  for s in range(20 - 15 + 1)]
    for clip in clips:
        assert min(np.abs(clip.astype(int) - c.astype(int)).max() for c in candidates) <= 1


def test_no_fvd_reports_the_code_metrics_and_sampling_overrides_go_on_the_runs_section(trained, tmp_path):
    done = mebt_eval("--checkpoint", trained["run_dir"], "--num-samples", 4, "--batch-size", 4, "--real-dir",
                     trained["videos"], "--real-split", "train", "--num-real", 4, "--cache-dir", tmp_path / "cache",
                     "--no-fvd", "--no-mlflow", "--out", tmp_path / "out", "sampling.ctemp=3.0")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(report["metrics"]) == CODE_METRICS and report["note"] == "FVD/KVD skipped: --no-fvd"
    assert not (tmp_path / "out" / "features").exists()    # no I3D work at all
    # ctemp given, every other key from the run (which trained with sampling.steps=2)
    assert report["sampling"]["ctemp"] == 3.0 and report["sampling"]["steps"] == 2
    assert report["sampling_from"] == "given"


def test_samples_too_short_for_i3d_are_refused_before_sampling_then_scored_with_repeated_frames(trained, tmp_path):
    from mebt.eval.evaluate import EvalConfig, real_clips
    from mebt.eval.fvd import fvd
    from mebt.eval.i3d import i3d_features
    from mebt.eval.i3d_weights import load_i3d

    # The first 8 of the 16 frames: I3D needs 9.
    args = ["--checkpoint", trained["run_dir"], "--num-samples", 4, "--batch-size", 4, "--i3d", trained["i3d"],
            "--real-dir", trained["videos"], "--real-split", "train", "--num-real", 4, "--cache-dir",
            tmp_path / "cache", "--no-mlflow", "--out", tmp_path / "out", "--frames", 8]
    done = mebt_eval(*args)
    assert done.returncode == 2 and "pass --repeat-frames 2" in done.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()   # refused before any sampling
    done = mebt_eval(*args, "--repeat-frames", 2)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(report["metrics"]) == {"fvd8x2", "kvd8x2"} | CODE_METRICS
    assert report["protocol"]["frames"] == 8 and report["protocol"]["repeat_frames"] == 2
    # Both sides are the first 8 frames with every frame shown twice, and the FVD is theirs.
    i3d = load_i3d(trained["i3d"])
    videos = np.load(tmp_path / "out" / "samples" / "batch_00000.npz")["video"][:, :8]
    [stored] = (tmp_path / "out" / "features").glob("*/batch_00000.npz")
    generated = np.load(stored)["full"]
    assert np.allclose(generated, i3d_features(i3d, np.repeat(videos, 2, axis=1)), rtol=1e-4, atol=1e-4)
    [key] = [p for p in (tmp_path / "cache").glob("*.json") if "i3d" in json.loads(p.read_text())]   # not the codes
    assert json.loads(key.read_text())["frames"] == 8 and json.loads(key.read_text())["repeat_frames"] == 2
    real = np.load(key.with_suffix(".npy"))
    cfg = EvalConfig(checkpoint="unused", real_dir=str(trained["videos"]), real_split="train", num_real=4)
    clips = real_clips(cfg, 8, videos.shape[2], report["protocol"]["real_frame_stride"])
    assert np.allclose(real, i3d_features(i3d, np.repeat(clips, 2, axis=1)), rtol=1e-4, atol=1e-4)
    assert report["metrics"]["fvd8x2"] == pytest.approx(fvd(real, generated))
