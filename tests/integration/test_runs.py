"""mebt.eval.runs against real MLflow stores: a local sqlite store (fast) and the shared test server (HTTP path)."""
from __future__ import annotations

import json
import logging
import math
import re
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from mebt.errors import UserError
from mebt.eval.runs import compare_runs, format_table, list_runs, resolve_tracking_uri

# name -> (optim.lr, train/loss at steps 0, 10, 20, eval/fvd16 {step: value} or None)
RUNS = {
    "lr-1e-3": ("0.001", [2.0, 1.0, 1.2], {10: 500.0, 20: 450.0}),
    "lr-3e-4": ("0.0003", [2.0, 1.5, 0.8], {20: 300.0}),
    "lr-1e-2": ("0.01", [3.0, 2.5, math.nan], None),  # diverged: NaN must not count as best
}
LONG = "a/very/long/shared/path/that/goes/on/and/on/tokenizer.pt"


def populate(uri: str) -> None:
    """Experiment 'mebt' with RUNS (sharing every param but optim.lr and the run dir), 'other' with one run, 'empty'."""
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("mebt")
    now = int(time.time() * 1000)
    for i, (name, (lr, losses, fvd)) in enumerate(RUNS.items()):
        run = client.create_run(exp, run_name=name, start_time=now + i)
        params = {"optim.lr": lr, "model.n_layer": "4", "deepspeed.zero_stage": "2", "train.tokenizer": LONG,
                  "train.run_dir": f"/runs/{name}"}
        metrics = [Metric("train/loss", v, now, step) for step, v in zip((0, 10, 20), losses)]
        metrics += [Metric("train/acc1", v, now, step) for step, v in zip((0, 10, 20), (0.1, 0.3 + i / 10, 0.2))]
        metrics += [Metric("eval/fvd16", v, now, step) for step, v in (fvd or {}).items()]
        client.log_batch(run.info.run_id, metrics=metrics, params=[Param(k, v) for k, v in params.items()])
        client.set_terminated(run.info.run_id)
    other = client.create_experiment("other")
    run = client.create_run(other, run_name="solo")
    client.log_batch(run.info.run_id, metrics=[Metric("train/loss", 5.0, now, 7)])
    client.create_experiment("empty")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("runs_store")
    uri = f"sqlite:///{path}/mlflow.db"
    populate(uri)
    return uri


def one_line_error(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(UserError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_compare_shows_only_varying_params_best_and_last(store, tmp_path):
    result = compare_runs(store, "mebt", metrics=["train/loss", "eval/fvd16", "train/acc1"], plot=tmp_path / "cmp.png")
    assert result["varying_params"] == ["optim.lr"]  # the run dir differs too, but only by identity
    assert result["common_params"] == {"deepspeed.zero_stage": "2", "model.n_layer": "4", "train.tokenizer": LONG}
    names = [r["name"] for r in result["runs"]]
    assert names == ["lr-3e-4", "lr-1e-3", "lr-1e-2"]  # by best train/loss
    by_name = {r["name"]: r["metrics"] for r in result["runs"]}
    assert by_name["lr-1e-3"]["train/loss"] == {"best": 1.0, "best_step": 10, "last": 1.2, "last_step": 20}
    assert by_name["lr-3e-4"]["train/loss"] == {"best": 0.8, "best_step": 20, "last": 0.8, "last_step": 20}
    diverged = by_name["lr-1e-2"]["train/loss"]
    assert (diverged["best"], diverged["best_step"], diverged["last_step"]) == (2.5, 10, 20)
    assert math.isnan(diverged["last"])
    assert by_name["lr-1e-3"]["eval/fvd16"] == {"best": 450.0, "best_step": 20, "last": 450.0, "last_step": 20}
    assert by_name["lr-1e-2"]["eval/fvd16"] is None
    assert by_name["lr-1e-3"]["train/acc1"]["best"] == 0.3  # acc-like: the maximum

    lines = result["table"].splitlines()
    header = lines[0].split()
    assert header[:4] == ["run", "run_id", "status", "optim.lr"]
    assert "train/loss" in header and "model.n_layer" not in header and "train.run_dir" not in header
    assert [line.split()[0] for line in lines[2:5]] == names
    assert lines[2].split()[3:7] == ["0.0003", "0.8", "@20", "0.8"]
    assert lines[4].split()[4:10] == ["2.5", "@10", "nan", "@20", "-", "-"]  # lr-1e-2 has no eval/fvd16
    common = result["table"].split("common:")[1]
    assert "model.n_layer=4" in common and "a/very/long/shared/path/tha..." in common  # truncated to 30 chars

    png = tmp_path / "cmp.png"
    assert result["plot"] == str(png)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000  # a rendered 3-panel figure, not a stub


def test_compare_filter_and_missing_first_metric(store):
    result = compare_runs(store, "mebt", metrics=["eval/fvd16"], filter="params.`optim.lr` != '0.0003'")
    assert [r["name"] for r in result["runs"]] == ["lr-1e-3", "lr-1e-2"]  # without the metric: last
    # one run left: nothing varies, everything is common
    single = compare_runs(store, "mebt", filter="metrics.`eval/fvd16` < 400")
    assert [r["name"] for r in single["runs"]] == ["lr-3e-4"] and single["varying_params"] == []
    assert single["common_params"]["optim.lr"] == "0.0003"


def test_list_runs(store, tmp_path):
    rows = list_runs(store, "mebt")
    assert len(rows) == 3 and {r["name"] for r in rows} == set(RUNS)
    assert [r["name"] for r in rows] == list(RUNS)[::-1]  # newest first
    assert all(r["last_step"] == 20 and r["status"] == "FINISHED" and r["experiment"] == "mebt" for r in rows)
    by_name = {r["name"]: r for r in rows}
    assert by_name["lr-1e-3"]["train/loss"] == 1.2 and by_name["lr-1e-3"]["eval/fvd16"] == 450.0
    assert by_name["lr-1e-2"]["eval/fvd16"] is None
    assert len(list_runs(store)) == 4  # every experiment
    assert [r["name"] for r in list_runs(store, filter="params.`optim.lr` = '0.001'")] == ["lr-1e-3"]
    assert [r["name"] for r in list_runs(store, max_runs=1)] == ["solo"]
    table = format_table(rows, ["name", "last_step", "eval/fvd16"])
    assert table.splitlines()[2:] == ["lr-1e-2         20           -", "lr-3e-4         20         300",
                                      "lr-1e-3         20         450"]


def test_user_errors_are_one_line(store, tmp_path, monkeypatch):
    msg = one_line_error("unknown MLflow experiment 'nope'", compare_runs, store, "nope")
    assert "available: Default, empty, mebt, other" in msg
    one_line_error("unknown MLflow experiment", list_runs, store, "nope")
    bad = "params.optim.lr === 1"
    assert bad in one_line_error("bad run filter", compare_runs, store, "mebt", filter=bad)
    one_line_error("bad run filter", list_runs, store, filter="metrics.`eval/fvd16` <")
    one_line_error("no runs in experiment 'empty'", compare_runs, store, "empty")
    one_line_error("no runs in experiment 'mebt' match filter", list_runs, store, "mebt",
                   filter="params.`optim.lr` = '42'")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    msg = one_line_error(f"no MLflow store at '{tmp_path / 'mlflow.db'}'", list_runs, None)
    assert "--tracking-uri" in msg and "MLFLOW_TRACKING_URI" in msg and "sqlite:///$PWD/mlflow.db" in msg
    assert not (tmp_path / "mlflow.db").exists()
    missing = tmp_path / "typo" / "mlflow.db"
    one_line_error("no MLflow store at", compare_runs, f"sqlite:///{missing}", "mebt")
    assert not missing.parent.exists()  # not created as an empty store
    one_line_error("at least one metric", compare_runs, store, "mebt", metrics=[])
    # Without --experiment, compare means the store's only experiment with runs ('empty' has none).
    one_line_error(re.escape("holds runs in 2 experiments (mebt, other); pass --experiment NAME"), compare_runs,
                   store)


def test_tracking_uri_resolution(store, tmp_path, monkeypatch, caplog):
    db = Path(store[len("sqlite:///"):])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    assert resolve_tracking_uri(None) == store
    assert len(list_runs(None, "mebt")) == 3
    assert resolve_tracking_uri(str(db.parent)) == store  # a folder holding mlflow.db (a run dir of old)
    assert resolve_tracking_uri(str(db)) == store
    run_dir = tmp_path / "run"   # a run dir: the store it recorded, wherever that is
    run_dir.mkdir()
    (run_dir / "mlflow.json").write_text(json.dumps({"tracking_uri": store, "experiment": "mebt"}))
    assert resolve_tracking_uri(str(run_dir)) == store
    # No flag and no variable: the working directory's store, where runs started here log by default.
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(db.parent)
    with caplog.at_level(logging.INFO, logger="mebt.eval.runs"):
        caplog.clear()
        assert [r["name"] for r in list_runs(None, "mebt")] == list(RUNS)[::-1]
        assert compare_runs(None, "mebt")["runs"]
    assert [r.getMessage() for r in caplog.records] == [f"MLflow store {store}"] * 2   # one line each


def test_compare_over_http_server(mlflow_server, tmp_path):
    """The CLI's usual case: a tracking server, metric keys with '/' passed over REST."""
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    name = f"runs-test-{time.time_ns()}"  # the server is shared by the session
    exp = client.create_experiment(name)
    for lr, losses in (("0.001", [2.0, 0.5]), ("0.002", [2.0, 0.9])):
        run = client.create_run(exp, run_name=f"lr={lr}")
        client.log_batch(run.info.run_id, params=[Param("optim.lr", lr), Param("model.n_layer", "2")],
                         metrics=[Metric("train/loss", v, 0, s) for s, v in enumerate(losses)])
    result = compare_runs(mlflow_server.uri, name, plot=tmp_path / "p.png")
    assert result["varying_params"] == ["optim.lr"]
    assert [r["metrics"]["train/loss"]["best"] for r in result["runs"]] == [0.5, 0.9]
    assert (tmp_path / "p.png").stat().st_size > 1000
    one_line_error("bad run filter", compare_runs, mlflow_server.uri, name, filter="params.x ==")


def test_unreachable_server_is_one_line(monkeypatch):
    from mebt.train.distributed import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the user's setting wins over ours: fail at once
    one_line_error("cannot read MLflow tracking store", list_runs, f"http://127.0.0.1:{free_port()}")
