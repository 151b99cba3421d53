"""MLflow experiment tracking for training runs, on rank 0 only, that can never stop training.

A ``Tracker`` takes metrics, params, tags and artifacts from the training loop and sends them to an
MLflow tracking server (or a local sqlite store) from ONE daemon background thread:

* Only rank 0 logs (``active=False`` elsewhere): every method is then a cheap no-op, nothing is
  imported, no thread runs, nothing is written.
* The training loop never waits on the network: ``log_metrics`` appends to an in-memory buffer and
  returns; the thread sends the buffer with ``log_batch`` every ``flush_every_s`` seconds (one HTTP
  call per metric costs ~100 ms, which a hot loop cannot afford).
* A tracking server that is down at start or dies mid-run is an inconvenience, not a crash: points
  stay buffered (at most ``max_buffered``; the oldest are dropped and counted), the thread retries
  with backoff, one ``TrackingWarning`` says so, and ``close()`` reports what was lost, returning
  within its timeout even when the server never answers. No exception ever reaches the caller.
* A resumed training passes the ``run_id`` it saved in its checkpoint and continues the same run.

Where runs log by default: one store per working directory, MLflow 3's own default made absolute,
``sqlite:///$PWD/mlflow.db`` with artifacts in ``$PWD/mlruns`` (what a bare ``mlflow ui`` there shows), so
every run started from one project folder lands in one store and ``mebt runs compare`` sees them all. The
store a run used is recorded in its run dir (``mlflow.json``): a resumed run stays in it, and ``mebt eval``
and ``mebt runs`` find it from any folder.
"""
from __future__ import annotations

import collections
import json
import os
import shutil
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import yaml

from mebt.errors import ConfigError
from mebt.fsutil import write_json
from mebt.logs import adopt_library_logger
from mebt.train.metrics_sync import HISTORY, PREFIX, logged_steps, not_logged, send


class TrackingWarning(UserWarning):
    """Experiment tracking is degraded (server unreachable, points dropped); training goes on."""


STORE_RECORD = "mlflow.json"   # in a run dir: the store (and experiment) the run logs to


def default_tracking_uri(folder: str | Path | None = None) -> str:
    """The store of a working directory: MLflow 3's default ``sqlite:///mlflow.db``, made absolute."""
    return f"sqlite:///{Path(folder or os.getcwd()).resolve() / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a local sqlite URI; None for servers and other databases."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?")[0]
    return None if path in ("", ":memory:") else Path(path)


def recorded_tracking_uri(run_dir: str | Path | None) -> str | None:
    """The store a run dir recorded; a run dir from before the record (its own ``mlflow.db``) means that db."""
    if run_dir is None:
        return None
    record, old_default = Path(run_dir) / STORE_RECORD, Path(run_dir) / "mlflow.db"
    if record.is_file():
        try:
            return json.loads(record.read_text())["tracking_uri"]
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"'{record}' is not a store record written by mebt train (delete it to log to the "
                              "default store)") from None
    return f"sqlite:///{old_default.resolve()}" if old_default.is_file() else None


def recorded_run_id(run_dir: str | Path | None) -> str | None:
    """The MLflow run id a run dir recorded beside its store (written as soon as the run exists, so also
    when the first checkpoint was written before it did)."""
    record = Path(run_dir) / STORE_RECORD if run_dir is not None else None
    if record is None or not record.is_file():
        return None
    try:
        return json.loads(record.read_text()).get("run_id")
    except (ValueError, AttributeError):
        return None


def tracking_uri(configured: str | None, run_dir: str | Path | None) -> str:
    """Where a run logs: the configured URI, else the store its run dir recorded (a resumed run stays where it
    started), else $MLFLOW_TRACKING_URI, else the store of the working directory."""
    return (configured or recorded_tracking_uri(run_dir) or os.environ.get("MLFLOW_TRACKING_URI")
            or default_tracking_uri())


@dataclass
class MLflowConfig:
    enabled: bool = True
    tracking_uri: str | None = None  # None: the run dir's recorded store, $MLFLOW_TRACKING_URI, sqlite:///$PWD/mlflow.db
    experiment: str = "mebt"
    run_name: str | None = None      # None: the run dir's name
    system_metrics: bool = False  # mlflow's cpu/mem/gpu monitor when its optional deps exist
    flush_every_s: float = 5.0  # how often the background thread sends buffered metrics
    max_buffered: int = 100_000  # points kept while the server is unreachable; older ones dropped

    def __post_init__(self):
        if not self.experiment or not self.experiment.strip():
            raise ConfigError("config key 'mlflow.experiment' must be a non-empty name, e.g. 'mebt'")
        if not self.flush_every_s > 0:
            raise ConfigError(f"config key 'mlflow.flush_every_s' must be positive, got {self.flush_every_s}")
        if self.max_buffered < 1:
            raise ConfigError(f"config key 'mlflow.max_buffered' must be at least 1, got {self.max_buffered}")
        if self.tracking_uri is not None and not self.tracking_uri.strip():
            raise ConfigError("config key 'mlflow.tracking_uri' must be a URI or null (null: $MLFLOW_TRACKING_URI, "
                              "else sqlite:///$PWD/mlflow.db)")


# The one HTTP policy of every MLflow client mebt makes (the training tracker, `mebt eval`, `mebt runs`):
# 10 s per attempt and one retry, so a call to a port nobody listens on fails at once and one to a server
# that never answers after ~22 s (measured), instead of after mlflow's default 7 retries with exponential
# backoff and 120 s timeouts (minutes). The tracker retries forever on its own anyway, and a one-shot
# command should say "cannot reach" quickly. mlflow reads these variables at every request, so they are
# process-wide; setdefault: a user's explicit setting wins.
HTTP_POLICY = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
               "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5"}
_BATCH = 1000  # mlflow's MAX_METRICS_PER_BATCH
_MAX_BACKOFF_S = 30.0


def mlflow_client(uri: str):
    """An ``MlflowClient`` for ``uri`` under ``HTTP_POLICY``; mlflow is imported only here (ranks > 0 never pay for it)."""
    for key, value in HTTP_POLICY.items():
        os.environ.setdefault(key, value)
    from mlflow.tracking import MlflowClient

    adopt_library_logger("mlflow", env_level="MLFLOW_LOGGING_LEVEL")   # "Creating initial MLflow database tables..."
    return MlflowClient(uri)


def _brief(exc: Exception) -> str:
    text = str(exc).replace("\n", " ")
    return f"{type(exc).__name__}: {text[:200]}{'...' if len(text) > 200 else ''}"


def _permanent(exc: Exception) -> bool:
    """True for errors that retrying cannot fix (bad key/value, 4xx) as opposed to a server being down."""
    code = getattr(exc, "get_http_status_code", lambda: 500)()
    return 400 <= code < 500 and code != 429


def _experiment_id(client, uri: str, name: str) -> str:
    """The id of experiment ``name``, created when missing. A local sqlite store keeps its artifacts beside
    its db in MLflow's layout (``mlruns/<experiment id>``): mlflow itself would use ./mlruns of whatever
    folder the process runs in, which differs from the db's folder for a resumed run or a configured path."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    db = sqlite_path(uri)
    try:
        if db is None:   # a server or another database decides where artifacts go
            return client.create_experiment(name)
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        return SqlAlchemyStore(uri, str(db.parent.resolve() / "mlruns")).create_experiment(name)
    except Exception:
        exp = client.get_experiment_by_name(name)   # another run in the same store created it meanwhile
        if exp is None:
            raise
        return exp.experiment_id


class Tracker:
    """Rank-0 MLflow logging that never stops training."""

    def __init__(self, cfg: MLflowConfig, run_dir: str | Path, *, active: bool, run_id: str | None = None,
                 params: dict | None = None, tags: dict | None = None, start_ms: int | None = None,
                 replay: list[tuple[str, float, int]] | None = None):
        """``replay``: the (key, value, step) points the run logged before this start (``metrics_sync``): those
        the MLflow run lacks are sent first, and later points at steps it has already are not sent again."""
        self.run_id: str | None = None  # set by the thread once the run exists on the server
        self._active = bool(active and cfg.enabled)
        if not self._active:
            return
        # The run's times are the training's, passed explicitly: the background thread creates the run (and
        # closes it) whenever the server answers, which can be long after training started.
        self._start_ms, self._end_ms = int(start_ms or time.time() * 1000), None
        self._cfg, self._run_dir = cfg, Path(run_dir).resolve()
        self._resume_id, self._params, self._tags = run_id, dict(params or {}), dict(tags or {})
        self._replay, self._logged = list(replay or []), {}
        self._uri = tracking_uri(cfg.tracking_uri, self._run_dir)
        self._cond = threading.Condition()  # guards the queues and counters; notified when the thread progresses
        self._points: collections.deque = collections.deque()  # (seq, key, value, timestamp_ms, step)
        self._artifacts: collections.deque = collections.deque()  # (staged local copy, artifact_path)
        self._seq = self._sent = self._dropped = self._n_staged = 0
        self._params_done = self._closing = self._abandon = False
        self._warned: set[str] = set()
        try:   # before any network: `mebt eval` and `mebt runs` of this run dir find the store from any folder
            write_json(self._run_dir / STORE_RECORD, {"tracking_uri": self._uri, "experiment": cfg.experiment})
        except OSError as e:
            self._warn(f"MLflow: cannot record the store in '{self._run_dir}' ({_brief(e)}); training continues")
        self._status, self._result, self._monitor = "FINISHED", None, None
        self._stage: str | None = None  # temp folder of artifact copies, made on first use
        self._wake = threading.Event()  # send now: flush, close, or a full batch is waiting
        self._kick = threading.Event()  # cut a retry backoff short: flush and close only
        self._thread = threading.Thread(target=self._loop, name="mebt-mlflow", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ caller side: memory only, never raises
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self._active:
            return
        ts, rows = int(time.time() * 1000), []
        for key, value in metrics.items():
            try:
                rows.append((str(key), float(value), int(step)))
            except Exception as e:  # a value float() cannot read must not kill training
                self._warn(f"MLflow: metric '{key}' at step {step} is not a number ({_brief(e)}); skipped", once=f"nan:{key}")
        with self._cond:
            if self._closing:
                return
            for key, value, s in rows:
                self._seq += 1
                self._points.append((self._seq, key, value, ts, s))
            overflow = max(len(self._points) - self._cfg.max_buffered, 0)
            for _ in range(overflow):  # the server is away: keep the newest points
                self._points.popleft()
            self._dropped += overflow
            if len(self._points) >= _BATCH:
                self._wake.set()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self._active:  # copied now: the file may change or vanish before the thread uploads it
            src = Path(path)
            self._stage_artifact(src.name, artifact_path, lambda dst: (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst))

    def log_dict(self, obj: dict, artifact_file: str) -> None:
        def write(dst: Path):
            with open(dst, "w") as f:
                if dst.suffix in (".yaml", ".yml"):
                    yaml.safe_dump(obj, f, sort_keys=False)
                else:
                    json.dump(obj, f, indent=2, default=str)

        if self._active:
            parent = str(Path(artifact_file).parent)
            self._stage_artifact(Path(artifact_file).name, None if parent == "." else parent, write)

    def flush(self, timeout: float = 30.0) -> bool:
        if not self._active:
            return True
        deadline = time.monotonic() + timeout
        self._wake.set()
        self._kick.set()
        with self._cond:
            while not (self.run_id and self._params_done and not self._points and not self._artifacts):
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._cond.wait(min(left, 0.5))
            return True

    def close(self, status: str = "FINISHED", timeout: float = 30.0) -> dict:
        if not self._active:
            return {"sent": 0, "dropped": 0, "pending": 0}
        if self._result is not None:  # closing twice is harmless
            return dict(self._result)
        with self._cond:
            self._closing, self._status, self._end_ms = True, status, int(time.time() * 1000)
        self._wake.set()
        self._kick.set()
        self._thread.join(timeout)  # the thread sends what is left, then ends the run
        with self._cond:
            self._abandon = True  # a thread still stuck on a dead server gives up at its next step
            self._result = {"sent": self._sent, "dropped": self._dropped, "pending": len(self._points)}
            n_art = len(self._artifacts)
        if self._stage:  # unsent copies are lost either way; an abandoned upload just fails silently
            shutil.rmtree(self._stage, ignore_errors=True)
        r = self._result
        if r["dropped"] or r["pending"] or n_art:
            self._warn(f"MLflow run {self.run_id or '(never created)'} at {self._uri}: {r['dropped']} metric points dropped "
                       f"and {r['pending']} not sent ({n_art} artifacts not sent); the training itself is unaffected, "
                       f"and its metrics are in {self._run_dir / HISTORY}: `mebt runs sync {self._run_dir}` sends "
                       "them once the server is back (so does the next start of the run)")
        return dict(r)

    def _stage_artifact(self, name: str, artifact_path: str | None, write) -> None:
        try:
            with self._cond:
                if self._stage is None:
                    self._stage = tempfile.mkdtemp(prefix="mebt-mlflow-")
                self._n_staged += 1
                slot = Path(self._stage) / str(self._n_staged)  # one folder per item: names never clash
            slot.mkdir()
            write(slot / name)
            with self._cond:
                self._artifacts.append((slot / name, artifact_path))
            self._wake.set()
        except Exception as e:
            self._warn(f"MLflow: could not stage artifact '{name}' ({_brief(e)}); it will not be logged, training continues", stacklevel=4)

    def _warn(self, msg: str, once: str | None = None, stacklevel: int = 3) -> None:
        if once is not None:  # one warning per kind of trouble, not one per step
            if once in self._warned:
                return
            self._warned.add(once)
        warnings.warn(msg, TrackingWarning, stacklevel=stacklevel)

    # ------------------------------------------------------------ background thread: all network work
    def _loop(self) -> None:
        backoff, client = 1.0, None
        while not self._abandon:
            try:
                if client is None:
                    if sqlite_path(self._uri) is not None:   # mlflow creates the db, not its folder
                        sqlite_path(self._uri).parent.mkdir(parents=True, exist_ok=True)
                    client = mlflow_client(self._uri)
                if not self._params_done:
                    self._start(client)
                self._send(client)
                backoff = 1.0
                if self._closing:
                    return self._finish(client)
                self._wake.wait(self._cfg.flush_every_s)
                self._wake.clear()
            except Exception as e:  # whatever happens here, training goes on
                if not self._abandon:  # after close() returned, stay silent
                    self._warn(f"MLflow tracking at {self._uri} failed ({_brief(e)}); training continues and up to "
                               f"{self._cfg.max_buffered} metric points are buffered and retried", once="down")
                self._kick.wait(backoff)
                self._kick.clear()
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
            finally:
                with self._cond:
                    self._cond.notify_all()

    def _start(self, client) -> None:
        from mlflow.entities import Param, RunTag
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH, MAX_TAG_VAL_LENGTH

        if self.run_id is None:
            exp_id = _experiment_id(client, self._uri, self._cfg.experiment)
            run = None
            if self._resume_id:
                try:
                    run = client.get_run(self._resume_id)
                except Exception as e:
                    if not _permanent(e):
                        raise
                    self._warn(f"MLflow run {self._resume_id} does not exist at {self._uri}; logging to a new run instead")
                else:
                    client.update_run(run.info.run_id, status="RUNNING")
            if run is None:
                # Named after the run dir by default: mlflow's random names come from `random`, which training seeds,
                # so every run of a seed would get the same one.
                run = client.create_run(exp_id, start_time=self._start_ms,
                                        run_name=self._cfg.run_name or self._run_dir.name)
            self.run_id = run.info.run_id
            self._start_monitor(resumed=self.run_id == self._resume_id)
            try:   # the run id beside the store, before any checkpoint: `mebt runs sync` and evaluations find it
                write_json(self._run_dir / STORE_RECORD, {"tracking_uri": self._uri, "experiment": self._cfg.experiment,
                                                          "run_id": self.run_id})
            except OSError:
                pass   # warned at start already: the run dir is not writable
        data = client.get_run(self.run_id).data
        if self._replay is not None:   # what the run has logged (before a kill, or a server away) and lacks
            keys = {k for k, _, _ in self._replay} | {k for k in data.metrics if k.startswith(PREFIX)}
            self._logged = logged_steps(client, self.run_id, keys)
            send(client, self.run_id, not_logged(self._replay, self._logged), int(time.time() * 1000))
            self._replay = None
        # Params are immutable in MLflow: log only keys the run lacks (on resume, or on a retry after a
        # partial start) and report the ones whose value changed.
        old = data.params
        new = {str(k): str(v)[:MAX_PARAM_VAL_LENGTH] for k, v in self._params.items()}
        changed = sorted(k for k in new if k in old and old[k] != new[k])
        if changed:
            self._warn(f"MLflow run {self.run_id}: params {', '.join(changed[:10])} changed since the run started; "
                       "MLflow keeps the first values", once="params")
        params = [Param(k, v) for k, v in new.items() if k not in old]
        tags = [RunTag(str(k), str(v)[:MAX_TAG_VAL_LENGTH]) for k, v in self._tags.items()]
        n = MAX_PARAMS_TAGS_PER_BATCH
        for i in range(0, max(len(params), len(tags)), n):
            client.log_batch(self.run_id, params=params[i:i + n], tags=tags[i:i + n])
        self._params_done = True

    def _start_monitor(self, resumed: bool) -> None:
        if not self._cfg.system_metrics:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self.run_id, resume_logging=resumed, tracking_uri=self._uri)
            self._monitor.start()
        except Exception as e:  # psutil missing and the like: go on without system metrics
            self._monitor = None
            self._warn(f"MLflow system metrics unavailable ({_brief(e)}); training continues without them; "
                       "install psutil (pynvml for GPUs) or set mlflow.system_metrics=false", once="sysmetrics")

    def _send(self, client) -> None:
        from mlflow.entities import Metric

        while self._points and not self._abandon:
            with self._cond:
                batch = [self._points[i] for i in range(min(_BATCH, len(self._points)))]
            lost = False
            try:   # steps the run has already (redone after a kill) are not logged twice
                fresh = [Metric(k, v, ts, s) for _, k, v, ts, s in batch if s not in self._logged.get(k, ())]
                if fresh:
                    client.log_batch(self.run_id, metrics=fresh)
            except Exception as e:
                if not _permanent(e):
                    raise
                lost = True  # e.g. an invalid key: retrying would block the queue forever, so drop the batch
                self._warn(f"MLflow rejected {len(batch)} metric points ({_brief(e)}); they are dropped", once="reject")
            with self._cond:
                n = 0
                while self._points and self._points[0][0] <= batch[-1][0]:  # some may have overflowed meanwhile
                    self._points.popleft()
                    n += 1
                self._dropped += n if lost else 0
                self._sent += 0 if lost else n
                self._cond.notify_all()
        while self._artifacts and not self._abandon:
            local, artifact_path = self._artifacts[0]
            try:
                if local.is_dir():
                    client.log_artifacts(self.run_id, str(local), str(Path(artifact_path or "") / local.name))
                else:
                    client.log_artifact(self.run_id, str(local), artifact_path)
            except Exception as e:
                if not _permanent(e):
                    raise
                self._warn(f"MLflow rejected artifact '{local.name}' ({_brief(e)}); it is not logged", once="reject-art")
            with self._cond:
                self._artifacts.popleft()
            shutil.rmtree(local.parent, ignore_errors=True)

    def _finish(self, client) -> None:
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            monitor.finish()  # joins its thread and sends its last sample
        self._send(client)
        client.set_terminated(self.run_id, status=self._status, end_time=self._end_ms)
