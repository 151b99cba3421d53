"""`mebt train` tracked in a real MLflow server: params, metrics and artifacts, the same run after a resume,
and training that finishes when the server dies."""
import json
import subprocess
import time

from mlflow.tracking import MlflowClient

from tests.helpers.engine import command, communicate_while_progressing, overrides
from tests.mlflow_fixtures import start_mlflow_server


def tracked(codes_dir, run_dir, uri, experiment, **extra) -> list[str]:
    return overrides(codes_dir, run_dir, **{"mlflow.enabled": "true", "mlflow.tracking_uri": uri,
                                            "mlflow.experiment": experiment, "mlflow.flush_every_s": 0.2, **extra})


def test_params_metrics_artifacts_and_the_same_run_after_resume(codes_dir, mlflow_server, tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.run(command(1, tracked(codes_dir, run_dir, mlflow_server.uri, "resume", **{"train.steps": 10})),
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    run_id = json.loads(first.stdout.strip().splitlines()[-1])["mlflow_run_id"]
    second = subprocess.run(command(1, tracked(codes_dir, run_dir, mlflow_server.uri, "resume", **{"train.steps": 20})),
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads(second.stdout.strip().splitlines()[-1])["mlflow_run_id"] == run_id

    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("resume")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run_id]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.n_embd"] == "32" and run.data.params["deepspeed.zero_stage"] == "2"
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [5, 10, 15, 20]
    for name in ("train/samples_per_s", "train/tokens_per_s", "train/step_time_s", "train/data_wait_s",
                 "train/peak_memory_mib", "train/lr"):
        assert len(client.get_metric_history(run_id, name)) == 4, name
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "deepspeed_config.json", "samples"} <= artifacts
    assert {a.path for a in client.list_artifacts(run_id, "samples")} == {"samples/step_00000010.npy",
                                                                          "samples/step_00000020.npy"}


def test_training_finishes_when_the_tracking_server_dies(codes_dir, tmp_path):
    with start_mlflow_server(tmp_path / "server") as server:
        run_dir = tmp_path / "run"
        args = tracked(codes_dir, run_dir, server.uri, "dies", **{"train.steps": 400, "train.ckpt_every": 1000})
        proc = subprocess.Popen(command(1, args), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        client = MlflowClient(server.uri)
        deadline = time.monotonic() + 240
        while not client.search_experiments(filter_string="name = 'dies'") or not client.search_runs(
                [client.get_experiment_by_name("dies").experiment_id]) or not client.get_metric_history(
                client.search_runs([client.get_experiment_by_name("dies").experiment_id])[0].info.run_id,
                "train/loss"):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.1)
        server.kill()
        out, err = communicate_while_progressing(proc)   # no wall-time limit: a loaded machine is slow, not stuck
    assert proc.returncode == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["step"] == 400 and result["tracking"]["dropped"] + result["tracking"]["pending"] > 0
    assert "TrackingWarning" in err
