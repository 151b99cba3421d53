"""``RUN_DIR/metrics.jsonl`` is the record of a run's training metrics; its MLflow run holds a copy.

What the copy lacks (points still buffered when a run ended with the server away, points dropped from a
full buffer) is sent again, and what it has already (the steps a run redoes after ``kill -9``, logged
before the kill) is not sent twice: when the run starts again (the ``Tracker`` replays the record) and
on demand with ``mebt runs sync RUN_DIR``. A point is known by its (key, step), so syncing is idempotent.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from mebt.errors import UserError

HISTORY = "metrics.jsonl"
PREFIX = "train/"     # a record's fields are logged as train/<field> at its step
_BATCH = 1000         # mlflow's MAX_METRICS_PER_BATCH


def history_points(records: list[dict]) -> list[tuple[str, float, int]]:
    """(key, value, step) of every metric of ``metrics.jsonl`` records, as training logs them."""
    return [(PREFIX + k, float(v), int(r["step"])) for r in records for k, v in r.items() if k != "step"]


def read_history(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / HISTORY
    if not path.is_file():
        return []
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except ValueError as e:
        raise UserError(f"'{path}' is not a metrics record written by mebt train ({e})") from None


def logged_steps(client, run_id: str, keys) -> dict[str, set[int]]:
    """The steps at which the run already has each key."""
    return {key: {m.step for m in client.get_metric_history(run_id, key)} for key in sorted(keys)}


def not_logged(points: list[tuple[str, float, int]], logged: dict[str, set[int]]) -> list[tuple[str, float, int]]:
    return [p for p in points if p[2] not in logged.get(p[0], ())]


def send(client, run_id: str, points: list[tuple[str, float, int]], timestamp_ms: int) -> None:
    from mlflow.entities import Metric

    for i in range(0, len(points), _BATCH):
        client.log_batch(run_id, metrics=[Metric(k, v, timestamp_ms, s) for k, v, s in points[i:i + _BATCH]])


def sync_run(run_dir: str | Path, client, run_id: str) -> dict:
    """Send the points of ``RUN_DIR/metrics.jsonl`` that MLflow run ``run_id`` lacks (``client``: an
    ``MlflowClient`` from ``tracking.mlflow_client``); returns the counts."""
    points = history_points(read_history(run_dir))
    missing = not_logged(points, logged_steps(client, run_id, {k for k, _, _ in points}))
    send(client, run_id, missing, int(time.time() * 1000))
    return {"run_id": run_id, "sent": len(missing), "present": len(points) - len(missing)}
