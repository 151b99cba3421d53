"""`mebt launch slurm` against a real SLURM cluster (two emulated nodes started by launchers/local_slurm.sh):
a 2-node training job, a job requeued mid-run that resumes into the same MLflow run, a preprocessing
array, the dry run, and one-line errors before anything is submitted."""
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers.engine import latest, overrides, steps_traced, trace, wait_for

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launchers" / "local_slurm.sh"


@pytest.fixture(scope="session")
def slurm_env():
    """The environment for SLURM client commands; the cluster is started if it is not up (idempotent)."""
    started = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=600)
    assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
    exports = subprocess.run(["bash", str(SCRIPT), "env"], capture_output=True, text=True, check=True).stdout
    env = dict(os.environ)
    for line in exports.splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export "):].partition("=")
            env[key] = value.strip("'\"")
    return env


def launch(args: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mebt.cli", "launch", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


def job_state(job_id: str, env: dict) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, env=env)
    return out.stdout.strip()


def wait_until_done(job_id: str, env: dict, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while job_state(job_id, env):
        assert time.monotonic() < deadline, f"job {job_id} still {job_state(job_id, env)} after {timeout} s"
        time.sleep(0.5)


def submitted_job(run_dir: Path) -> str:
    return json.loads((run_dir / "launch.json").read_text())["job_id"]


def train_then_signal(run_dir: Path, launch_args: list[str], env: dict, after_steps: int, timeout: float = 400):
    """Submit a training job, send it USR2 (what SLURM sends before a time limit) once it has traced
    ``after_steps`` steps, and wait until it has left the queue; its job log (stderr) is returned."""
    done = launch(["slurm", "train", *launch_args], env)
    assert done.returncode == 0, done.stderr[-3000:]
    job = submitted_job(run_dir)
    wait_for(lambda: steps_traced(run_dir) >= after_steps, lambda: launch(["status", str(run_dir)], env).stdout,
             timeout=300)
    subprocess.run(["scancel", "--signal=USR2", job], check=True, env=env)
    wait_until_done(job, env, timeout=timeout)
    return Path(json.loads((run_dir / "launch.json").read_text())["stderr"]).read_text()


def test_two_node_training_job_finishes_with_its_checkpoint_and_mlflow_run(codes_dir, mlflow_server, slurm_env,
                                                                           tmp_path):
    run_dir = tmp_path / "run"
    args = overrides(codes_dir, run_dir, **{"train.steps": 12, "mlflow.enabled": "true",
                                            "mlflow.tracking_uri": mlflow_server.uri, "mlflow.experiment": "slurm2"})
    start = time.monotonic()
    done = launch(["slurm", "train", "--nodes", "2", "--time", "10", *args], slurm_env)
    assert done.returncode == 0, done.stderr[-3000:]
    job = submitted_job(run_dir)
    assert f"submitted train job {job}" in done.stdout
    wait_until_done(job, slurm_env)
    print(f"2-node job round trip: {time.monotonic() - start:.1f} s")
    assert (run_dir / "checkpoints" / "latest").read_text() == "global_step12"
    assert [len(trace(run_dir, r)) for r in (0, 1)] == [12, 12]
    result = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert result["step"] == 12
    client = MlflowClient(mlflow_server.uri)
    runs = client.search_runs([client.get_experiment_by_name("slurm2").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["launcher"] == "env" and runs[0].data.tags["world_size"] == "2"
    status = launch(["status", str(run_dir)], slurm_env)
    assert status.returncode == 0 and "checkpoint: global_step12" in status.stdout


def test_signalled_job_requeues_and_resumes_into_the_same_mlflow_run(codes_dir, mlflow_server, slurm_env,
                                                                     tmp_path):
    run_dir = tmp_path / "run"
    args = overrides(codes_dir, run_dir, **{"train.steps": 400, "train.ckpt_every": 1000, "mlflow.enabled": "true",
                                            "mlflow.tracking_uri": mlflow_server.uri, "mlflow.experiment": "requeue"})
    # USR2 mid-run: checkpoint, requeue, resume.
    log = train_then_signal(run_dir, ["--nodes", "2", "--time", "10", *args], slurm_env, after_steps=5, timeout=600)
    assert (run_dir / "checkpoints" / "latest").read_text() == "global_step400"
    steps = [r["step"] for r in trace(run_dir, 0)]
    assert steps == list(range(1, 401))   # trimmed back to the signal's checkpoint, then every step once
    assert "requeue of job" in log
    client = MlflowClient(mlflow_server.uri)
    runs = client.search_runs([client.get_experiment_by_name("requeue").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert max(m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")) == 400


def test_dry_run_prints_the_sbatch_script_and_submits_nothing(codes_dir, tmp_path):
    run_dir = tmp_path / "run"
    done = launch(["slurm", "train", "--dry-run", "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu",
                   "--time", "1:30:00", "--account", "proj", "--mem", "64G", "--exclusive",
                   *overrides(codes_dir, run_dir, **{"deepspeed.precision": "bf16"})], dict(os.environ))
    assert done.returncode == 0, done.stderr[-3000:]
    script = done.stdout
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --time=90", "#SBATCH --account=proj", "#SBATCH --mem=64G",
                 "#SBATCH --exclusive", "#SBATCH --requeue", "#SBATCH --signal=USR2@120", "srun "):
        assert line in script, line
    assert not run_dir.exists()


@pytest.mark.parametrize("extra, message", [
    (["--partition", "nosuch"], "unknown SLURM partition 'nosuch'"),
    (["--nodes", "3", "train.global_batch_size=8"], "not a multiple"),
])
def test_bad_submissions_are_one_line_and_submit_nothing(codes_dir, slurm_env, tmp_path, extra, message):
    run_dir = tmp_path / "run"
    done = launch(["slurm", "train", *extra, *overrides(codes_dir, run_dir)], slurm_env)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and message in lines[-1] and lines[-1].startswith("mebt: error:"), done.stderr
    assert not run_dir.exists()


def test_missing_slurm_commands_are_one_line(codes_dir, tmp_path):
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}   # python, but no sbatch
    done = launch(["slurm", "train", *overrides(codes_dir, tmp_path / "run")], env)
    assert done.returncode == 2 and "SLURM commands not found" in done.stderr.strip().splitlines()[-1]


def test_preprocessing_array_of_two_tasks_makes_a_verified_dataset(data, slurm_env, tmp_path):
    out = tmp_path / "codes"
    args = [str(data.videos), "--out", str(out), "--tokenizer", str(data.tokenizer), "--sequence-length", "4",
            "--resolution", "16", "--videos-per-shard", "2", "--device", "cpu", "--no-progress"]
    done = launch(["slurm", "preprocess", "--num-tasks", "2", "--time", "10", *args], slurm_env)
    assert done.returncode == 0, done.stderr[-3000:]
    wait_until_done(submitted_job(out), slurm_env)
    verified = subprocess.run([sys.executable, "-m", "mebt.cli", "data", "verify", str(out)], capture_output=True,
                              text=True, cwd=ROOT)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    info = json.loads((out / "dataset.json").read_text())
    assert info["complete"] and info["counts"]["shards"] == 4   # 8 train videos (one unreadable), 2 per shard
    status = launch(["status", str(out)], slurm_env)
    assert status.returncode == 0 and "\"shards\": 4" in status.stdout


def test_local_executor_runs_the_same_job_as_local_processes(codes_dir, tmp_path):
    run_dir = tmp_path / "run"
    done = launch(["slurm", "train", "--local", "--tasks-per-node", "2", *overrides(codes_dir, run_dir,
                                                                                   **{"train.steps": 6})],
                  dict(os.environ))
    assert done.returncode == 0, done.stderr[-3000:]
    wait_for(lambda: latest(run_dir) == "global_step6",
             lambda: launch(["status", str(run_dir)], dict(os.environ)).stdout, timeout=300)
    assert [len(trace(run_dir, r)) for r in (0, 1)] == [6, 6]


def test_requeue_limit_ends_the_job_with_a_clear_message(codes_dir, slurm_env, tmp_path):
    run_dir = tmp_path / "run"
    args = overrides(codes_dir, run_dir, **{"train.steps": 400, "train.ckpt_every": 1000})
    log = train_then_signal(run_dir, ["--max-requeues", "0", "--time", "10", *args], slurm_env, after_steps=3)
    stopped = (run_dir / "checkpoints" / "latest").read_text()
    assert stopped != "global_step400" and len(trace(run_dir, 0)) == int(stopped.removeprefix("global_step"))
    assert "not requeued (requeue limit reached); submit the same command again to resume" in log


def test_evaluator_runs_as_its_own_job(trained, slurm_env, tmp_path):
    model = tmp_path / "model.pt"
    assert subprocess.run([sys.executable, "-m", "mebt.cli", "export", str(trained["run_dir"]), str(model)],
                          capture_output=True, cwd=ROOT).returncode == 0
    done = launch(["slurm", "eval", "--time", "10", "--checkpoint", str(model), "--tokenizer",
                   str(trained["tokenizer"]), "--num-samples", "2", "--no-mlflow", "sampling.steps=2"], slurm_env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = Path(str(model) + ".eval")
    wait_until_done(submitted_job(out), slurm_env)
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] and report["num_samples"] == 2
    status = launch(["status", str(out)], slurm_env)
    assert status.returncode == 0 and "report.json" in status.stdout


def test_a_job_requeued_onto_fewer_tasks_resumes_on_them_in_the_same_mlflow_run(codes_dir, mlflow_server, slurm_env,
                                                                                tmp_path):
    # A 2-node x 1-task job is signalled, checkpoints and requeues itself; while it waits, the operator gives it
    # one node (scontrol update). The requeued job runs 1 task from the code snapshot of its submission,
    # resumes elastically (4 clips per step: 2 x 2, then 1 x 2 x 2) and finishes in the same MLflow run, every
    # clip of the epoch taken once and every step logged once.
    run_dir = tmp_path / "run"
    args = overrides(codes_dir, run_dir, **{"data.batch_size": 2, "train.steps": 40, "train.ckpt_every": 1000,
                                            "mlflow.enabled": "true", "mlflow.tracking_uri": mlflow_server.uri,
                                            "mlflow.experiment": "elastic"})
    done = launch(["slurm", "train", "--nodes", "2", "--tasks-per-node", "1", "--time", "10", *args], slurm_env)
    assert done.returncode == 0, done.stderr[-3000:]
    job = submitted_job(run_dir)
    wait_for(lambda: steps_traced(run_dir) >= 3, lambda: launch(["status", str(run_dir)], slurm_env).stdout,
             timeout=300)
    subprocess.run(["scancel", "--signal=USR2", job], check=True, env=slurm_env)
    wait_for(lambda: job_state(job, slurm_env) == "PENDING", lambda: job_state(job, slurm_env), timeout=120)
    for command in (["hold", job], ["update", f"JobId={job}", "NumNodes=1-1", "NumTasks=1"], ["release", job]):
        subprocess.run(["scontrol", *command], check=True, env=slurm_env)
    wait_until_done(job, slurm_env)
    code = json.loads((run_dir / "launch.json").read_text())["code"]
    log = Path(json.loads((run_dir / "launch.json").read_text())["stderr"]).read_text()
    assert f"running the code in {code['path']} (restart 1 of at most 10)" in log
    assert "resuming a 2-process checkpoint on 1 process(es): 4 clips per step as 1 x 2 micro-batch(es) x 2" in log
    assert (Path(code["path"]) / "mebt" / "train" / "loop.py").is_file()
    status = launch(["status", str(run_dir)], slurm_env)
    assert f"code: {code['path']} (sha256 {code['sha256'][:12]}" in status.stdout
    assert (run_dir / "checkpoints" / "latest").read_text() == "global_step40"
    steps = defaultdict(list)
    for rank in (0, 1):
        for record in trace(run_dir, rank):
            steps[record["step"]] += record["keys"]
    assert sorted(steps) == list(range(1, 41)) and all(len(keys) == 4 for keys in steps.values())
    clips = [key for keys in steps.values() for key in keys]
    assert len(set(clips)) == len(clips) == 160   # 40 steps x 4 clips of an epoch of 300: each once
    client = MlflowClient(mlflow_server.uri)
    runs = client.search_runs([client.get_experiment_by_name("elastic").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    logged = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")]
    assert sorted(logged) == list(range(5, 41, 5))
