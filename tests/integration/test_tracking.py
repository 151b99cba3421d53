"""mebt.train.tracking against a real MLflow server (no mocks): logging, resume, a dying server, the default
store of the working directory."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mebt.errors import ConfigError
from mebt.train.distributed import free_port
from mebt.train.tracking import MLflowConfig, Tracker, TrackingWarning, recorded_tracking_uri
from tests.mlflow_fixtures import start_mlflow_server

FAST = dict(flush_every_s=0.2)


def _history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def _messages(records):
    return [str(r.message) for r in records if issubclass(r.category, TrackingWarning)]


def _tracker_threads():
    return [t for t in threading.enumerate() if t.name == "mebt-mlflow"]


def test_config_rejects_bad_values():
    for kwargs, key in [({"flush_every_s": 0}, "flush_every_s"), ({"max_buffered": 0}, "max_buffered"),
                        ({"experiment": " "}, "experiment")]:
        with pytest.raises(ConfigError, match=key) as e:
            MLflowConfig(**kwargs)
        assert "\n" not in str(e.value)


def test_params_metrics_and_artifacts_reach_the_server(mlflow_server, tmp_path):
    cfg = MLflowConfig(tracking_uri=mlflow_server.uri, experiment=f"e-{tmp_path.name}", run_name="r1", **FAST)
    params = {"model.n_layer": 4, "lr": 3e-4, "long": "x" * 10_000}
    params.update({f"p{i}": i for i in range(150)})  # more than one log_batch of params
    note = tmp_path / "note.txt"
    note.write_text("original")
    tracker = Tracker(cfg, tmp_path / "run", active=True, params=params, tags={"kind": "test"})
    for step in range(5):
        tracker.log_metrics({"loss": 1.0 / (step + 1), "lr": 1e-4 * step}, step=step)
    tracker.log_dict({"model": {"n_layer": 4}}, "config/resolved.yaml")
    tracker.log_artifact(note)
    note.write_text("changed after logging")  # the tracker must have copied it at call time
    assert tracker.flush(timeout=60)
    assert tracker.run_id is not None
    result = tracker.close()
    assert result == {"sent": 10, "dropped": 0, "pending": 0}

    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "r1"
    assert run.data.params["model.n_layer"] == "4" and run.data.params["p149"] == "149"
    assert 0 < len(run.data.params["long"]) < 10_000  # truncated to mlflow's limit, not rejected
    assert run.data.tags["kind"] == "test"
    assert _history(client, tracker.run_id, "loss") == [(s, 1.0 / (s + 1)) for s in range(5)]
    assert [s for s, _ in _history(client, tracker.run_id, "lr")] == list(range(5))
    assert {a.path for a in client.list_artifacts(tracker.run_id)} == {"config", "note.txt"}
    assert [a.path for a in client.list_artifacts(tracker.run_id, "config")] == ["config/resolved.yaml"]
    local = client.download_artifacts(tracker.run_id, "note.txt", str(tmp_path / "dl"))
    assert open(local).read() == "original"


def test_resume_continues_the_same_run(mlflow_server, tmp_path):
    cfg = MLflowConfig(tracking_uri=mlflow_server.uri, experiment=f"e-{tmp_path.name}", **FAST)
    first = Tracker(cfg, tmp_path, active=True, params={"lr": 1})
    first.log_metrics({"loss": 3.0}, step=0)
    first.log_metrics({"loss": 2.0}, step=1)
    assert first.close()["sent"] == 2

    second = Tracker(cfg, tmp_path, active=True, run_id=first.run_id, params={"lr": 1, "resumed_from": 1})
    second.log_metrics({"loss": 1.0}, step=2)
    assert second.flush(timeout=60)
    client = MlflowClient(mlflow_server.uri)
    assert second.run_id == first.run_id
    assert client.get_run(first.run_id).info.status == "RUNNING"
    second.close()

    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"lr": "1", "resumed_from": "1"}
    assert _history(client, first.run_id, "loss") == [(0, 3.0), (1, 2.0), (2, 1.0)]
    exp = client.get_experiment_by_name(cfg.experiment)
    assert len(client.search_runs([exp.experiment_id])) == 1


def test_resume_of_unknown_run_starts_a_new_one(mlflow_server, tmp_path):
    cfg = MLflowConfig(tracking_uri=mlflow_server.uri, experiment=f"e-{tmp_path.name}", **FAST)
    with pytest.warns(TrackingWarning, match="does not exist"):
        tracker = Tracker(cfg, tmp_path, active=True, run_id="0" * 32)
        tracker.log_metrics({"loss": 1.0}, step=0)
        assert tracker.flush(timeout=60)
    assert tracker.run_id not in (None, "0" * 32)
    tracker.close()
    assert _history(MlflowClient(mlflow_server.uri), tracker.run_id, "loss") == [(0, 1.0)]


def test_server_killed_mid_run(tmp_path):
    server = start_mlflow_server(tmp_path / "server")
    try:
        cfg = MLflowConfig(tracking_uri=server.uri, experiment="killed", **FAST)
        tracker = Tracker(cfg, tmp_path / "run", active=True)
        for step in range(3):
            tracker.log_metrics({"loss": float(step)}, step=step)
        assert tracker.flush(timeout=60)
        run_id = tracker.run_id
        server.kill()
        with warnings.catch_warnings(record=True) as records:
            warnings.simplefilter("always")
            for step in range(3, 8):
                tracker.log_metrics({"loss": float(step)}, step=step)
                time.sleep(0.1)
            assert not tracker.flush(timeout=1)
            results = []  # close() in a helper thread so that a hang fails the test instead of stalling it
            closer = threading.Thread(target=lambda: results.append(tracker.close(timeout=3)), daemon=True)
            closer.start()
            closer.join(60)
            assert results, "close() did not return within 60 s"
            result = results[0]
        assert result["sent"] == 3 and result["pending"] == 5 and result["dropped"] == 0
        messages = _messages(records)
        assert any("training continues" in m for m in messages)
        assert any("5 not sent" in m for m in messages)
    finally:
        server.stop()
    # What was sent before the crash is in the server's sqlite db.
    client = MlflowClient(server.db_uri)
    assert _history(client, run_id, "loss") == [(0, 0.0), (1, 1.0), (2, 2.0)]


def test_unreachable_from_the_start(tmp_path):
    cfg = MLflowConfig(tracking_uri=f"http://127.0.0.1:{free_port()}", **FAST)
    with pytest.warns(TrackingWarning) as records:
        tracker = Tracker(cfg, tmp_path, active=True, params={"a": 1})
        for step in range(4):
            tracker.log_metrics({"loss": 1.0, "acc": 0.5}, step=step)
        tracker.log_dict({"a": 1}, "config.json")
        assert not tracker.flush(timeout=0.5)
        result = tracker.close(timeout=2)
    assert tracker.run_id is None
    assert result == {"sent": 0, "dropped": 0, "pending": 8}
    assert any("8 not sent" in m and "1 artifacts" in m for m in _messages(records))


def test_max_buffered_drops_the_oldest(tmp_path):
    cfg = MLflowConfig(tracking_uri=f"http://127.0.0.1:{free_port()}", max_buffered=10, **FAST)
    with pytest.warns(TrackingWarning) as records:
        tracker = Tracker(cfg, tmp_path, active=True)
        for step in range(25):
            tracker.log_metrics({"loss": float(step)}, step=step)
        assert [p[4] for p in tracker._points] == list(range(15, 25))  # the newest are kept
        result = tracker.close(timeout=1)
    assert result == {"sent": 0, "dropped": 15, "pending": 10}
    assert any("15 metric points dropped and 10 not sent" in m for m in _messages(records))


def test_default_store_is_the_working_directorys_and_each_run_dir_records_it(tmp_path, monkeypatch):
    """Two runs started from one folder share its store (MLflow's sqlite:///mlflow.db, artifacts in mlruns/);
    each run dir records it, and a run resumed from another folder stays in it."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(project)
    store = f"sqlite:///{project / 'mlflow.db'}"
    ids = []
    for name in ("a", "b"):
        tracker = Tracker(MLflowConfig(**FAST), tmp_path / name, active=True)
        tracker.log_metrics({"loss": 0.5}, step=7)
        tracker.log_dict({"a": 1}, "config.json")
        assert tracker.flush(timeout=120)
        assert tracker.close()["sent"] == 1
        ids.append(tracker.run_id)
        record = json.loads((tmp_path / name / "mlflow.json").read_text())
        assert record == {"tracking_uri": store, "experiment": "mebt", "run_id": tracker.run_id}
        assert recorded_tracking_uri(tmp_path / name) == store
        assert not (tmp_path / name / "mlflow.db").exists()
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("mebt")
    assert {r.info.run_id for r in client.search_runs([exp.experiment_id])} == set(ids)
    assert sorted(p.parent.parent.name for p in (project / "mlruns").rglob("config.json")) == sorted(ids)
    assert sorted(p.name for p in project.iterdir()) == ["mlflow.db", "mlruns"]

    monkeypatch.chdir(elsewhere)
    resumed = Tracker(MLflowConfig(**FAST), tmp_path / "a", active=True, run_id=ids[0])
    resumed.log_metrics({"loss": 0.25}, step=8)
    assert resumed.flush(timeout=120) and resumed.run_id == ids[0]
    resumed.close()
    assert _history(client, ids[0], "loss") == [(7, 0.5), (8, 0.25)]
    assert list(elsewhere.iterdir()) == []


def test_a_local_store_elsewhere_keeps_its_artifacts_beside_its_db(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "stores" / "mine" / "mlflow.db"
    tracker = Tracker(MLflowConfig(tracking_uri=f"sqlite:///{db}", experiment="beside", **FAST), tmp_path / "run",
                      active=True)
    tracker.log_dict({"a": 1}, "config.json")
    assert tracker.flush(timeout=120)
    tracker.close()
    exp = MlflowClient(f"sqlite:///{db}").get_experiment_by_name("beside")
    assert exp.artifact_location == str(db.parent / "mlruns" / exp.experiment_id)   # MLflow's own layout
    assert [p.name for p in (db.parent / "mlruns").rglob("config.json")] == ["config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "stores"]   # nothing in the working directory


def test_run_times_are_the_trainings_not_the_background_threads(tmp_path, monkeypatch):
    """The run is created by the thread whenever the store answers: its start time is the one training
    passed, earlier than its first metric, and its end time is when close() was called."""
    monkeypatch.chdir(tmp_path)
    started = int(time.time() * 1000) - 60_000   # training started a minute before the tracker
    tracker = Tracker(MLflowConfig(**FAST), tmp_path / "run", active=True, start_ms=started)
    tracker.log_metrics({"loss": 0.5}, step=1)
    assert tracker.flush(timeout=120)
    time.sleep(1.0)
    closing = int(time.time() * 1000)
    tracker.close()
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(tracker.run_id)
    assert run.info.start_time == started
    assert closing <= run.info.end_time <= closing + 500   # not when the thread got to it
    assert run.info.status == "FINISHED"


def test_inactive_tracker_does_nothing(tmp_path):
    before = len(_tracker_threads())
    note = tmp_path / "note.txt"
    note.write_text("x")
    for tracker in (Tracker(MLflowConfig(**FAST), tmp_path / "run", active=False),
                    Tracker(MLflowConfig(enabled=False), tmp_path / "run", active=True)):
        tracker.log_metrics({"loss": 1.0}, step=0)
        tracker.log_artifact(note)
        tracker.log_dict({"a": 1}, "c.yaml")
        assert tracker.flush() is True
        assert tracker.close() == {"sent": 0, "dropped": 0, "pending": 0}
        assert tracker.run_id is None
    assert len(_tracker_threads()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["note.txt"]
    # ... and it does not even import mlflow (ranks > 0 must not pay for it).
    code = ("import sys; from mebt.train.tracking import MLflowConfig, Tracker; "
            "t = Tracker(MLflowConfig(), 'unused', active=False); t.log_metrics({'a': 1}, 0); t.close(); "
            "assert 'mlflow' not in sys.modules, 'mlflow imported'")
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


def test_system_metrics_are_logged(mlflow_server, tmp_path, monkeypatch):
    import psutil  # noqa: F401  (deepspeed requires it; mlflow's system metrics need it)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    cfg = MLflowConfig(tracking_uri=mlflow_server.uri, experiment=f"e-{tmp_path.name}", system_metrics=True, **FAST)
    tracker = Tracker(cfg, tmp_path, active=True)
    assert tracker.flush(timeout=60)
    client, deadline, keys = MlflowClient(mlflow_server.uri), time.monotonic() + 60, []
    while not keys and time.monotonic() < deadline:
        keys = [k for k in client.get_run(tracker.run_id).data.metrics if k.startswith("system/")]
        time.sleep(0.2)
    tracker.close()
    assert "system/cpu_utilization_percentage" in keys


DEAD_SERVER = """
import json, os, sys, time
from mebt.errors import UserError
from mebt.eval.evaluate import log_to_mlflow
from mebt.eval.runs import list_runs
from mebt.train.tracking import HTTP_POLICY, mlflow_client

uri, run_dir = sys.argv[1], sys.argv[2]
start = time.monotonic()
logged, message = log_to_mlflow({"mlflow_run_id": "0" * 32, "config": {"mlflow": {"tracking_uri": uri}}, "run_dir": run_dir,
                         "step": 3, "tag": "global_step3"}, {"metrics": {"fvd": 1.0}}, [])
evaluate_s = time.monotonic() - start
start = time.monotonic()
try:
    list_runs(uri)
except UserError as e:
    runs_error = str(e)
runs_s = time.monotonic() - start
start = time.monotonic()
try:
    mlflow_client(uri).get_run("0" * 32)
except Exception as e:
    tracker_error = type(e).__name__
tracker_s = time.monotonic() - start
policy = {k: os.environ.get(k) for k in HTTP_POLICY}
print(json.dumps(dict(message=message, evaluate_s=evaluate_s, runs_error=runs_error, runs_s=runs_s,
                      tracker_error=tracker_error, tracker_s=tracker_s, policy=policy, expected=HTTP_POLICY)))
"""


def test_every_mlflow_client_gives_up_on_a_dead_server_within_seconds(tmp_path):
    """The evaluator's logging, `mebt runs` and the tracker's client against a port nobody listens on fail in
    seconds under the one HTTP policy (mlflow's own defaults retry for minutes). A fresh process without
    MLFLOW_HTTP_* variables, so that neither the user's settings nor an earlier test's count."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP_REQUEST")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH")]))
    uri = f"http://127.0.0.1:{free_port()}"
    try:
        done = subprocess.run([sys.executable, "-c", DEAD_SERVER, uri, str(tmp_path)], capture_output=True,
                              text=True, env=env, timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("MLflow clients were still retrying a dead server after 180 s")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["policy"] == result["expected"]
    assert result["message"].startswith("not logged: MLflow logging failed (") and "\n" not in result["message"]
    assert result["runs_error"].startswith(f"cannot read MLflow tracking store {uri}")
    assert result["tracker_error"] == "MlflowException"
    assert max(result["evaluate_s"], result["runs_s"], result["tracker_s"]) < 10, result


def test_metrics_the_server_missed_are_sent_once_at_resume_and_by_runs_sync(mlflow_server, tmp_path, capsys):
    from mebt.cli import main
    from mebt.train.metrics_sync import history_points

    cfg = MLflowConfig(tracking_uri=mlflow_server.uri, experiment=f"e-{tmp_path.name}", **FAST)
    records = [{"step": s, "loss": 10.0 - s, "acc1": s / 10} for s in range(1, 9)]
    first = Tracker(cfg, tmp_path, active=True)
    for r in records[:3]:   # the server saw steps 1-3; 4-6 were still buffered when the run ended
        first.log_metrics({"train/loss": r["loss"]}, step=r["step"])
    assert first.close()["sent"] == 3
    assert json.loads((tmp_path / "mlflow.json").read_text())["run_id"] == first.run_id   # known before a checkpoint
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:6]))

    client = MlflowClient(mlflow_server.uri)
    for sent in (9, 0):   # 3 losses and 6 accuracies; then nothing: points are known by (key, step)
        assert main(["runs", "sync", str(tmp_path)]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["sent"] == sent
        assert _history(client, first.run_id, "train/loss") == [(s, 10.0 - s) for s in range(1, 7)]
    # A resumed run replays the record (steps 7, 8 are new to the server) and does not log again the steps it
    # redoes that the server has (6, logged before a kill -9).
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    second = Tracker(cfg, tmp_path, active=True, run_id=first.run_id, replay=history_points(records))
    second.log_metrics({"train/loss": 99.0}, step=6)
    second.log_metrics({"train/loss": 1.0}, step=9)
    assert second.flush(timeout=60)
    second.close()
    assert _history(client, first.run_id, "train/loss") == [(s, 10.0 - s) for s in range(1, 9)] + [(9, 1.0)]
    assert [s for s, _ in _history(client, first.run_id, "train/acc1")] == list(range(1, 9))
