"""`mebt launch slurm train|preprocess`: submitit jobs on a SLURM cluster.

Training: one submitit task per GPU (or per process on CPU) on each node. Every task derives the
torch.distributed/DeepSpeed rendezvous from the submitit job environment (ranks and world size; the master
is the first hostname; the port comes from the job id so all tasks agree without talking), then runs the
same ``train`` as `mebt train`. The job runs what was submitted: its config is resolved at submission and
pickled with it, and its code is a snapshot made at submission (``launchers.snapshot``).

Requeue, one mechanism and one counter: SLURM sends SIGUSR2 ``signal_delay_s`` before the time limit
(``--signal``, submitit's convention) and SIGTERM on preemption or ``scancel``. Either makes the training
checkpoint at the next step boundary (a signal that arrives while the task is still starting is kept and
honoured at the first one); then rank 0 requeues the job with ``scontrol requeue``, up to ``max_requeues``
times counted by SLURM's own SLURM_RESTART_COUNT, and every task exits with code 75 and no result, so
submitit sees a requeued job, not a finished one. submitit's own requeue (``checkpoint()``,
``max_num_timeout``) is not used. The requeued job resumes from the checkpoint into the same run directory
and MLflow run, with ``tasks_per_node`` tasks on each node it gets this time (an operator may requeue it
onto fewer: ``scontrol update JobId=J NumNodes=1-1 NumTasks=1`` while it waits; elastic resume).

Preprocessing: a job array, one task per slice (``--task-index/--num-tasks`` of `mebt preprocess`); the
task that finishes the last shard merges the manifest, and a rerun only redoes missing shards.

The submission is recorded in ``RUN_DIR/launch.json`` (job id, logs) for `mebt launch status RUN_DIR`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data_pipeline.preprocess import PreprocessConfig
from launchers.snapshot import absolute_paths, snapshot_code, working_dir
from mebt.config import as_base
from mebt.errors import ConfigError, UserError
from mebt.eval.evaluate import EvalJob
from mebt.train.config import RunConfig

LAUNCH_JSON = "launch.json"


@dataclass
class SlurmConfig:
    nodes: int = 1
    gpus_per_node: int = 0                 # 0: a CPU job
    tasks_per_node: int | None = None      # default: gpus_per_node, or 1 on CPU
    partition: str | None = None
    time: str = "60"                       # minutes, or [D-]HH:MM[:SS]
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    mem: str | None = None                 # per node, e.g. 64G
    cpus_per_task: int | None = None
    exclusive: bool = False
    signal_delay_s: int = 120              # SIGUSR2 this long before the time limit
    max_requeues: int = 10
    job_name: str = "mebt"

    def __post_init__(self):
        if self.nodes < 1 or self.gpus_per_node < 0 or (self.tasks_per_node is not None and self.tasks_per_node < 1):
            raise ConfigError("--nodes and --tasks-per-node must be >= 1 and --gpus-per-node >= 0")
        if self.tasks_per_node is None:
            self.tasks_per_node = self.gpus_per_node or 1
        self.time_min = minutes(self.time)

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node


def minutes(text: str) -> int:
    """SLURM time formats (M, H:M:S, D-H, D-H:M, D-H:M:S, M:S) in whole minutes, rounded up."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", str(text).strip())
    if not m:
        raise ConfigError(f"--time '{text}' is not a SLURM time (minutes, HH:MM:SS or D-HH:MM:SS)")
    days, a, b, c = (int(x) if x else None for x in m.groups())
    if days is None and b is None:
        seconds = a * 60                                # M
    elif days is None and c is None:
        seconds = a * 60 + b                            # M:S
    else:
        h, mi, s = a, b or 0, c or 0                    # [D-]H[:M[:S]]
        seconds = ((days or 0) * 24 + h) * 3600 + mi * 60 + s
    return max(1, -(-seconds // 60))


def check_cluster(cfg: SlurmConfig) -> None:
    """One line for what would make sbatch fail: no SLURM commands, or an unknown partition."""
    missing = [c for c in ("sbatch", "sinfo", "scontrol") if shutil.which(c) is None]
    if missing:
        raise UserError(f"SLURM commands not found ({', '.join(missing)}); run this on a SLURM login node, "
                        "use --local, or start the test cluster with launchers/local_slurm.sh start")
    if cfg.partition:
        out = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, timeout=60)
        known = sorted(set(out.stdout.split()))
        if out.returncode == 0 and cfg.partition not in known:
            raise UserError(f"unknown SLURM partition '{cfg.partition}' (available: {', '.join(known) or 'none'})")


def _submitit():
    try:
        import submitit
    except ImportError:
        raise UserError("submitit is not installed; pip install submitit (or make install)") from None
    return submitit


def executor(cfg: SlurmConfig, folder: Path, local: bool, array: int | None = None):
    """A submitit executor for ``cfg`` (the local executor runs the same tasks as local processes)."""
    submitit = _submitit()

    if local:
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(timeout_min=cfg.time_min, nodes=1, tasks_per_node=cfg.tasks_per_node,
                             gpus_per_node=cfg.gpus_per_node)
        return ex
    ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=0)   # requeues are the training's (module docstring)
    extra = {"requeue": True}   # scontrol requeue needs a requeueable job
    if cfg.account:
        extra["account"] = cfg.account
    # One task per GPU (or tasks_per_node) on each node this start of the job got: a job requeued onto fewer
    # nodes (scontrol update JobId=J NumNodes=N) runs N x tasks_per_node tasks and resumes elastically.
    tasks = f"$(( SLURM_JOB_NUM_NODES * {cfg.tasks_per_node} ))"
    setup = [f"export SLURM_NTASKS={tasks} SLURM_NPROCS={tasks}"]
    params = dict(job_name=cfg.job_name, time=cfg.time_min, nodes=cfg.nodes, ntasks_per_node=cfg.tasks_per_node,
                  signal_delay_s=cfg.signal_delay_s, additional_parameters=extra, stderr_to_stdout=False,
                  setup=setup)
    if cfg.gpus_per_node:
        params["gpus_per_node"] = cfg.gpus_per_node
    for key in ("partition", "qos", "constraint", "mem", "cpus_per_task"):
        if getattr(cfg, key) is not None:
            params[key] = getattr(cfg, key)
    if cfg.exclusive:
        params["exclusive"] = True
    if array is not None:
        params["array_parallelism"] = array
    ex.update_parameters(**params)
    return ex


def sbatch_script(cfg: SlurmConfig, folder: Path) -> str:
    """The sbatch script submitit would submit (for --dry-run): nothing is written or submitted."""
    from submitit.slurm.slurm import _make_sbatch_string

    params = dict(executor(cfg, folder, local=False).parameters)
    command = f"{sys.executable} -u -m submitit.core._submit {folder}"
    return _make_sbatch_string(command=command, folder=folder, **params)


def rendezvous_from_submitit() -> None:
    """RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* from the submitit job environment (SLURM or local executor)."""
    import submitit

    from mebt.train.distributed import slurm_port

    env = submitit.JobEnvironment()
    digits = re.sub(r"\D", "", str(env.job_id)) or "0"   # array tasks are JOB_INDEX
    os.environ.update(RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks), LOCAL_RANK=str(env.local_rank),
                      MASTER_ADDR=env.hostnames[0] if env.num_nodes > 1 else "127.0.0.1",
                      MASTER_PORT=str(slurm_port(digits)))


class TrainTask:
    """The callable each task runs: `mebt train` with the rendezvous from submitit, requeue on a stop signal."""

    def __init__(self, cfg, max_requeues: int):
        # The resolved config travels with the job: a requeued job trains what was submitted, whatever
        # happened to the YAML file since.
        self.cfg, self.max_requeues = cfg, max_requeues

    def __call__(self) -> dict:
        # From here on a stop signal is the training's: submitit's handlers would requeue on their own.
        early: list[str] = []
        for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: early.append(signal.Signals(signum).name))
        from mebt.train.loop import REQUEUE_EXIT_CODE, train

        rendezvous_from_submitit()
        if os.environ.get("RANK") == "0":
            print(f"mebt: running the code in {Path(__file__).resolve().parents[1]} (restart "
                  f"{os.environ.get('SLURM_RESTART_COUNT', 0)} of at most {self.max_requeues})", file=sys.stderr)
        result = train(self.cfg, early_signals=early)
        if not result["preempted"]:
            return result
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", 0))
        job = os.environ.get("SLURM_JOB_ID")
        if job is None or restarts >= self.max_requeues:
            raise RuntimeError(f"stopped by {result['preempted']} at step {result['step']} after a checkpoint; "
                               f"not requeued ({'not a SLURM job' if job is None else 'requeue limit reached'}); "
                               "submit the same command again to resume")
        if os.environ.get("RANK") == "0":
            # Fails harmlessly when SLURM is already requeueing the job (scontrol requeue, preemption).
            done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
            print(f"mebt: requeue of job {job}: {'ok' if done.returncode == 0 else done.stderr.strip()}",
                  file=sys.stderr)
        sys.exit(REQUEUE_EXIT_CODE)   # SystemExit: submitit writes no result, the requeued job will


def record(run_dir: Path, job, kind: str, cfg: SlurmConfig, command: list[str], code: dict | None = None) -> dict:
    job_id = str(job.job_id).split("_")[0]   # an array's tasks are JOB_0, JOB_1, ...
    info = {"kind": kind, "job_id": job_id, "submitted_at": time.time(), "slurm": asdict(cfg),
            "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr), "folder": str(job.paths.folder),
            "command": command, "code": code}
    from mebt.fsutil import write_bytes

    run_dir.mkdir(parents=True, exist_ok=True)
    write_bytes(run_dir / LAUNCH_JSON, json.dumps(info, indent=2).encode())
    return info


def _announce(info: dict, run_dir: Path, extra: str = "") -> None:
    print(f"submitted {info['kind']} job {info['job_id']}: logs {info['stdout']} (stderr {info['stderr']}), "
          f"run dir {run_dir}{extra}; follow with `mebt launch status {run_dir}`")


def submit_train(cfg, slurm: SlurmConfig, dry_run: bool = False, local: bool = False) -> dict | None:
    """Check everything that can be checked here, then submit (or print the sbatch script) ``cfg``, a RunConfig."""
    from data_pipeline.loader import make_loader
    from mebt.train.config import deepspeed_config
    from mebt.train.tracking import tracking_uri

    # Batch sizes against nodes x tasks, precision against the device, the dataset against the model: the
    # same one-line errors `mebt train` gives, before anything is queued.
    deepspeed_config(cfg, slurm.world_size, "cuda" if slurm.gpus_per_node else "cpu")
    make_loader(cfg.data, 0, slurm.world_size, expect_grid=tuple(cfg.model.latent_shape),
                expect_vocab=cfg.model.vocab_size)
    # What the job runs does not depend on the working directory or on later edits (launchers.snapshot).
    cfg = absolute_paths(cfg)
    run_dir = Path(cfg.train.run_dir)
    uri = tracking_uri(cfg.mlflow.tracking_uri, run_dir)
    cfg = dataclasses.replace(cfg, mlflow=dataclasses.replace(cfg.mlflow, tracking_uri=uri))
    return _queue(slurm, run_dir, "train", dry_run, local,
                  lambda folder: [executor(slurm, folder, local).submit(TrainTask(cfg, slurm.max_requeues))],
                  f", MLflow {uri} experiment '{cfg.mlflow.experiment}'" if cfg.mlflow.enabled else "",
                  snapshot=True)


def _queue(slurm: SlurmConfig, out: Path, kind: str, dry_run: bool, local: bool, submit, note: str = "",
           snapshot: bool = False) -> dict | None:
    """The sbatch script for a dry run; else check the cluster, ``submit(folder) -> jobs`` (from a snapshot of
    the code when asked), record, announce."""
    folder = out / "slurm"
    if dry_run:
        print(sbatch_script(slurm, folder))
        return None
    if not local:
        check_cluster(slurm)
    code = snapshot_code(folder) if snapshot else None
    with working_dir(code["path"]) if code else contextlib.nullcontext():
        jobs = submit(folder)
    info = record(out, jobs[0], kind, slurm, sys.argv, code)
    _announce(info, out, note + (f", code {code['path']}" if code else ""))
    return {**info, "jobs": jobs}


class PreprocessTask:
    """One task of a preprocessing job array: the same PreprocessConfig with this task's slice of the shards."""

    def __init__(self, cfg):
        self.cfg = cfg

    def __call__(self, index: int, count: int) -> dict:
        import dataclasses

        from data_pipeline.preprocess import preprocess

        return preprocess(dataclasses.replace(self.cfg, task_index=index, num_tasks=count))


def submit_preprocess(cfg, num_tasks: int, slurm: SlurmConfig, dry_run: bool = False,
                      local: bool = False) -> dict | None:
    """A job array of ``num_tasks`` tasks over ``cfg`` (a ``data_pipeline.preprocess.PreprocessConfig``)."""
    if not Path(cfg.input_dir).is_dir() or not Path(cfg.tokenizer).is_file():
        raise UserError("mebt launch slurm preprocess needs an existing INPUT_DIR and --tokenizer file")
    if num_tasks < 1:
        raise UserError(f"--num-tasks must be >= 1, got {num_tasks}")
    task = PreprocessTask(cfg)
    return _queue(slurm, Path(cfg.out_dir).resolve(), "preprocess", dry_run, local,
                  lambda folder: executor(slurm, folder, local, array=num_tasks).map_array(
                      task, list(range(num_tasks)), [num_tasks] * num_tasks),
                  f", {num_tasks} array tasks; the last one merges the manifest")


def _tail(path: str, lines: int) -> str:
    p = Path(path)
    return "\n".join(p.read_text(errors="replace").splitlines()[-lines:]) if p.is_file() else f"({path} not written yet)"


def status(run_dir: str | Path, lines: int = 15) -> dict:
    """State of the job recorded in RUN_DIR/launch.json: SLURM state, progress, log tail."""
    run_dir = Path(run_dir)
    path = run_dir / LAUNCH_JSON
    if not path.is_file():
        raise UserError(f"'{run_dir}' has no {LAUNCH_JSON}: it was not submitted with mebt launch slurm")
    info = json.loads(path.read_text())
    states = []
    if shutil.which("squeue"):
        out = subprocess.run(["squeue", "-h", "-j", info["job_id"], "-o", "%i %T"], capture_output=True, text=True,
                             timeout=60)
        states = out.stdout.split("\n") if out.returncode == 0 else []
    states = [s for s in states if s.strip()]
    report = {"job_id": info["job_id"], "kind": info["kind"],
              "state": "; ".join(states) if states else "not in the queue (finished, failed or cancelled)"}
    code = info.get("code")
    if code:
        git = (f", git {code['git_commit'][:12]}{' with uncommitted changes' if code['git_dirty'] else ''}"
               if code.get("git_commit") else "")
        report["code"] = f"{code['path']} (sha256 {code['sha256'][:12]}, {code['files']} files{git})"
    if info["kind"] == "train":
        metrics = run_dir / "metrics.jsonl"
        last = metrics.read_text().splitlines()[-1] if metrics.is_file() and metrics.stat().st_size else None
        report["last_logged"] = json.loads(last) if last else None
        from mebt.train.checkpoint import latest_tag

        report["checkpoint"] = latest_tag(run_dir)
    elif info["kind"] == "preprocess":
        dataset = run_dir / "dataset.json"
        report["dataset"] = json.loads(dataset.read_text()).get("counts") if dataset.is_file() else None
    else:
        report["reports"] = ", ".join(str(p) for p in sorted(run_dir.rglob("report.json"))) or None
    report["stdout_tail"] = _tail(info["stdout"], lines)
    report["stderr_tail"] = _tail(info["stderr"], lines)
    return report


def submit_eval(job, slurm: SlurmConfig, dry_run: bool = False, local: bool = False) -> dict | None:
    """The offline evaluator as its own job (e.g. watching a run beside its training job): ``job`` is a
    ``mebt.eval.evaluate.EvalJob``, called as it is in the job."""
    target = job.watch or job.config.checkpoint
    if not target or not Path(target).exists():
        raise UserError("mebt launch slurm eval needs an existing --checkpoint CKPT|RUN_DIR or --watch RUN_DIR")
    return _queue(slurm, job.record_dir(), "eval", dry_run, local,
                  lambda folder: [executor(slurm, folder, local).submit(job)])


# The typed configs of the `mebt launch slurm` commands: the job's own config plus the SLURM options.

@dataclass
class SlurmOptions:
    slurm: SlurmConfig = field(default_factory=SlurmConfig, metadata={"flags": True})
    dry_run: bool = False                  # print the sbatch script, submit nothing
    local: bool = False                    # run the same job with submitit's local executor

    def job_config(self, base: type):
        """The job's own config (an instance of ``base``) without the SLURM options."""
        return as_base(self, base)


@dataclass
class SlurmTrainJob(SlurmOptions, RunConfig):
    """`mebt launch slurm train`: a training config (as for `mebt train`) and the SLURM options."""


@dataclass
class SlurmPreprocessJob(SlurmOptions, PreprocessConfig):
    """`mebt launch slurm preprocess`: a preprocessing config whose num_tasks is the job array's size."""


@dataclass
class SlurmEvalJob(SlurmOptions, EvalJob):
    """`mebt launch slurm eval`: an evaluation (or a --watch) as its own job."""
