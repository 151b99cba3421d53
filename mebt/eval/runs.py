"""Compare training runs tracked in MLflow: ``list_runs`` (what is there) and ``compare_runs`` (how they differ).

Training logs the flattened config as params (``optim.lr``, ``model.n_layer``, ...) and metrics at steps
(``train/loss``, ``eval/fvd16``, ...). ``compare_runs`` shows only the params that differ between the chosen
runs, each metric's best value (direction guessed from its name) and last value with their steps, and can
plot metric vs step. Without a tracking URI they read the store of the working directory, where runs
started there log by default. Every user mistake (no store, unknown experiment, bad filter) is one UserError line.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import textwrap
import time
from pathlib import Path
from typing import Sequence

from mebt.errors import UserError
from mebt.train.tracking import default_tracking_uri, mlflow_client, recorded_tracking_uri, sqlite_path

KEY_METRICS = ("train/loss", "train/acc1", "eval/fvd16")  # shown by list_runs when a run has them
LIST_COLUMNS = ["name", "run_id", "experiment", "status", "start", "duration", "last_step", *KEY_METRICS]
# Params that differ for every run by construction: as "varying" columns they would only repeat the run name.
IDENTITY_PARAMS = frozenset({"train.run_dir", "mlflow.run_name"})
_HIGHER_IS_BETTER = ("acc", "psnr", "per_s", "mfu")
_MAX_PARAM_CHARS = 30
_URI_HINT = ("runs started here with default settings log to sqlite:///$PWD/mlflow.db; otherwise pass --tracking-uri "
             "URI|RUN_DIR or set MLFLOW_TRACKING_URI")
_FILTER_EXAMPLE = "params.`optim.lr` = '0.001'"

log = logging.getLogger(__name__)


def higher_is_better(metric: str) -> bool:
    """Accuracy-, PSNR-, throughput- and MFU-like metrics are maximised; losses, FVD, KVD minimised."""
    return any(word in metric.lower() for word in _HIGHER_IS_BETTER)


# ------------------------------------------------------------------------------------------ store access
def resolve_tracking_uri(tracking_uri: str | None) -> str:
    """The explicit URI, else $MLFLOW_TRACKING_URI, else the store of the working directory (where training
    started here logs by default). A run dir means the store that run recorded; a folder holding an
    mlflow.db or a .db path means that sqlite db."""
    uri = (tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()).strip()
    if "://" not in uri:  # a bare path: mlflow would take it as a file store and create one there
        path = Path(uri)
        recorded = recorded_tracking_uri(path) if path.is_dir() else None
        if recorded:
            uri = recorded
        elif path.suffix == ".db":
            uri = f"sqlite:///{path.resolve()}"
        else:
            raise UserError(f"'{uri}' is neither a run dir, a folder with an mlflow.db nor a .db file; {_URI_HINT}")
    db = sqlite_path(uri)
    # mlflow silently creates a missing database, so a typo would show an empty store and leave a file behind.
    if db is not None and not db.is_file():
        raise UserError(f"no MLflow store at '{db}' (tracking URI {uri}); {_URI_HINT}")
    log.info(f"MLflow store {uri}")
    return uri


def _one_line(exc: Exception, limit: int = 200) -> str:
    text = " ".join(str(getattr(exc, "message", None) or exc).split())
    return text if len(text) <= limit else text[:limit] + "..."


@contextlib.contextmanager
def _store_errors(uri: str):
    """Turn an unreachable or broken tracking store into one UserError line."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except (MlflowException, OSError) as e:
        raise UserError(f"cannot read MLflow tracking store {uri}: {_one_line(e)}") from None


def _experiments(client, experiment: str | None) -> dict[str, str]:
    """{experiment_id: name} for ``experiment`` (all active ones when None); unknown names list the known ones."""
    known = {e.experiment_id: e.name for e in client.search_experiments()}
    if experiment is None:
        return known
    found = {i: name for i, name in known.items() if name == experiment}
    if not found:
        names = ", ".join(sorted(known.values())) or "none"
        raise UserError(f"unknown MLflow experiment '{experiment}' (available: {names})")
    return found


def _only_experiment(client) -> str:
    """The one experiment of a store that has runs: what `compare` means without --experiment."""
    with_runs = sorted(e.name for e in client.search_experiments()
                       if client.search_runs([e.experiment_id], max_results=1))
    if len(with_runs) != 1:
        raise UserError(f"the store holds runs in {len(with_runs)} experiments ({', '.join(with_runs) or 'none'}); "
                        "pass --experiment NAME")
    return with_runs[0]


def _search(client, experiments: dict[str, str], filter: str | None, max_runs: int) -> list:
    from mlflow.exceptions import MlflowException

    if max_runs < 1:
        raise UserError(f"max_runs must be at least 1, got {max_runs}")
    try:  # newest first: with more runs than max_runs, the recent ones are the interesting ones
        runs = client.search_runs(list(experiments), filter_string=filter or "", max_results=max_runs,
                                  order_by=["attributes.start_time DESC"])
    except MlflowException as e:
        if filter and e.error_code == "INVALID_PARAMETER_VALUE":
            raise UserError(f"bad run filter \"{filter}\": {_one_line(e)} (example: {_FILTER_EXAMPLE}; "
                            "names with '/' or '.' need backticks)") from None
        raise
    if not runs:
        where = f"experiment '{next(iter(experiments.values()))}'" if len(experiments) == 1 else "the tracking store"
        raise UserError(f"no runs in {where}" + (f" match filter \"{filter}\"" if filter else ""))
    return list(runs)


# ------------------------------------------------------------------------------------------ formatting
def _fmt_value(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.1f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def _truncate(text: str, limit: int = _MAX_PARAM_CHARS) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s" if rest >= 60 else f"{rest}s"


def format_table(rows: list[dict], columns: list[str]) -> str:
    """Aligned plain-text table; missing cells show '-', numeric columns are right-aligned."""
    cells = [[_fmt_value(row.get(col)) for col in columns] for row in rows]
    numeric = [all(isinstance(row.get(col), (int, float)) or row.get(col) is None for row in rows) and
               any(row.get(col) is not None for row in rows) for col in columns]
    widths = [max([len(col)] + [len(r[i]) for r in cells]) for i, col in enumerate(columns)]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


# ------------------------------------------------------------------------------------------ list
def list_runs(tracking_uri: str | None, experiment: str | None = None, filter: str | None = None,
              max_runs: int = 100) -> list[dict]:
    """One dict per run (newest first) with the keys of ``LIST_COLUMNS``; print with ``format_table``."""
    uri = resolve_tracking_uri(tracking_uri)
    client = mlflow_client(uri)
    with _store_errors(uri):
        experiments = _experiments(client, experiment)
        runs = _search(client, experiments, filter, max_runs)
    now_ms, rows = time.time() * 1000, []
    for run in runs:
        info = run.info
        # Each latest metric carries its step (the store keeps the value at the highest step), so the
        # last step needs no per-run history request.
        latest = run.to_proto().data.metrics
        row = {"run_id": info.run_id, "experiment": experiments.get(info.experiment_id, info.experiment_id),
               "name": info.run_name, "status": info.status,
               "start": time.strftime("%Y-%m-%d %H:%M", time.localtime(info.start_time / 1000)),
               "duration": _duration(((info.end_time or now_ms) - info.start_time) / 1000),
               "last_step": max((m.step for m in latest), default=None)}
        row.update({key: run.data.metrics.get(key) for key in KEY_METRICS})
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ compare
def _summary(history: list, maximize: bool) -> dict | None:
    """Best (ignoring NaN; earliest step on ties) and last (highest step) value of a metric history."""
    points = sorted(history, key=lambda m: (m.step, m.timestamp))
    if not points:
        return None
    finite = [m for m in points if not math.isnan(m.value)]
    best = (max if maximize else min)(finite, key=lambda m: m.value) if finite else None
    return {"best": best.value if best else None, "best_step": best.step if best else None,
            "last": points[-1].value, "last_step": points[-1].step}


def _split_params(runs: list[dict]) -> tuple[list[str], dict[str, str]]:
    """(params whose value differs between runs, {param: value} shared by all); a param missing in some runs differs."""
    keys = sorted({k for r in runs for k in r["params"]} - IDENTITY_PARAMS)
    varying = [k for k in keys if len({r["params"].get(k) for r in runs}) > 1]
    common = {k: runs[0]["params"][k] for k in keys if k not in varying}
    return varying, common


def _plot(runs: list[dict], metrics: Sequence[str], histories: dict, path: str | Path) -> Path:
    # Figure without pyplot: no global backend switch, no GUI, safe in any process (renders with Agg).
    try:
        from matplotlib.figure import Figure
    except ModuleNotFoundError:
        raise UserError("mebt runs compare --plot needs matplotlib: pip install 'mebt[plot]'") from None

    path = Path(path)
    fig = Figure(figsize=(9, 3.2 * len(metrics)), layout="constrained")
    axes = fig.subplots(len(metrics), 1, sharex=True, squeeze=False)[:, 0]
    names = [r["name"] for r in runs]  # duplicate run names get their short id so the legend stays unambiguous
    labels = [r["name"] if names.count(r["name"]) == 1 else f"{r['name']} ({r['run_id'][:8]})" for r in runs]
    for ax, metric in zip(axes, metrics):
        for i, run in enumerate(runs):
            points = sorted(histories[run["run_id"]].get(metric, []), key=lambda m: (m.step, m.timestamp))
            if points:  # one color per run across subplots, so a single legend serves all
                # Markers for sparse histories (evals at checkpoints): a single point draws no line.
                ax.plot([m.step for m in points], [m.value for m in points], color=f"C{i % 10}",
                        linestyle="-" if i < 10 else "--", marker="o" if len(points) <= 50 else None,
                        markersize=3, label=labels[i])
        ax.set_title(metric + (" (higher is better)" if higher_is_better(metric) else " (lower is better)"))
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if not ax.lines:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    axes[-1].set_xlabel("step")
    handles = {line.get_label(): line for ax in axes for line in ax.lines}
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="outside right upper", fontsize="small")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot write plot '{path}': {_one_line(e)}") from None
    return path


def compare_runs(tracking_uri: str | None, experiment: str | None = None, metrics: Sequence[str] = ("train/loss",),
                 filter: str | None = None, max_runs: int = 50, plot: str | Path | None = None) -> dict:
    """Compare the runs of ``experiment`` (matching ``filter``; None: the store's only experiment with runs),
    best first by the first metric.

    Returns ``{"runs", "varying_params", "common_params", "table", "plot"}``: each run is a dict with
    run_id, name, status, params and metrics ``{metric: {best, best_step, last, last_step} or None}``.
    """
    metrics = list(dict.fromkeys(metrics))  # a repeated metric would make duplicate columns
    if not metrics:
        raise UserError("compare needs at least one metric, e.g. train/loss")
    uri = resolve_tracking_uri(tracking_uri)
    client = mlflow_client(uri)
    histories: dict[str, dict[str, list]] = {}
    with _store_errors(uri):
        found = _search(client, _experiments(client, experiment or _only_experiment(client)), filter, max_runs)
        runs = []
        for run in found:
            # get_metric_history pages through the whole history; keys with '/' are passed through as-is.
            hist = histories[run.info.run_id] = {m: client.get_metric_history(run.info.run_id, m) for m in metrics}
            runs.append({"run_id": run.info.run_id, "name": run.info.run_name, "status": run.info.status,
                         "params": dict(run.data.params),
                         "metrics": {m: _summary(hist[m], higher_is_better(m)) for m in metrics}})

    first, sign = metrics[0], (-1 if higher_is_better(metrics[0]) else 1)

    def rank(run):  # runs without the first metric go last; start order (newest first) breaks ties
        best = (run["metrics"][first] or {}).get("best")
        return (best is None, sign * best if best is not None else 0.0)

    runs.sort(key=rank)
    varying, common = _split_params(runs)

    def at(value, step):
        return "-" if value is None else f"{_fmt_value(value)} @{step}"

    rows = []
    for run in runs:
        row = {"run": run["name"], "run_id": run["run_id"][:8], "status": run["status"]}
        row.update({k: _truncate(run["params"][k]) if k in run["params"] else None for k in varying})
        for m in metrics:
            s = run["metrics"][m] or {}
            row[f"{m} best"] = at(s.get("best"), s.get("best_step"))
            row[f"{m} last"] = at(s.get("last"), s.get("last_step"))
        rows.append(row)
    columns = ["run", "run_id", "status", *varying] + [f"{m} {kind}" for m in metrics for kind in ("best", "last")]
    table = format_table(rows, columns)
    if common:
        shared = ", ".join(f"{k}={_truncate(v)}" for k, v in common.items())
        table += "\n\n" + textwrap.fill(f"common: {shared}", width=110, subsequent_indent="  ")
    if len(found) == max_runs:
        table += f"\n(only the newest {max_runs} matching runs were compared; raise max_runs for more)"
    out = _plot(runs, metrics, histories, plot) if plot is not None else None
    return {"runs": runs, "varying_params": varying, "common_params": common, "table": table,
            "plot": str(out) if out else None}
