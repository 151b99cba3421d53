"""DeepSpeed training of MeBT from streamed shards: `mebt train`.

One code path for one process with no launcher, torchrun, the deepspeed launcher and srun (see
``distributed``). ``train`` reads top to bottom: check everything that can be wrong (config, dataset,
batch sizes) -> process group -> model and engine -> resume -> loop -> final checkpoint. What a restart
needs (step, the loader position, every rank's RNG states, the MLflow run id) lives in ``TrainState`` and
the DeepSpeed checkpoint's client state; a run directory that has a checkpoint resumes from it, on any
number of processes that can share its clips per step (``config.elastic_layout``; the checkpoint is then
read through DeepSpeed's universal format and the loader keeps the saved plan's global batches).
Masks are drawn per clip from its slot in the epoch (``sample_id``) and the step, so they follow the clip
to whichever process and micro-batch takes it.

SIGTERM, SIGUSR1 or SIGUSR2 (SLURM's warning before a time limit or preemption; submitit asks SLURM for
USR2) asks for a stop: the ranks agree on it at a step boundary (the one after the signal's, see
``StopVote``: the vote never blocks a step), checkpoint there, and ``train`` returns ``preempted`` (rank 0
prints one line: the checkpoint and how to resume); the CLI then exits with ``REQUEUE_EXIT_CODE`` so a
launcher knows to requeue rather than fail. Ctrl-C does the same; a second one stops at once.

No micro-batch waits for the device: loss and accuracy are summed in float64 tensors on the training
device (FLOPs and tokens follow from shapes, on the host) and read once per ``log_every`` steps, with one
all-reduce; trace records keep their losses on the device until the next log or checkpoint step.
"""
from __future__ import annotations

import json
import logging
import os
import resource
import signal
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch import nn
from tqdm import tqdm

from data_pipeline.loader import make_loader
from mebt.config import flatten, to_dict
from mebt.core.flops import mebt_train_flops, mfu, peak_flops_per_s
from mebt.core.model import MeBT
from mebt.core.objective import ObjectiveConfig, chunked_masked_loss, param_groups, sample_masks, slot_seeds
from mebt.errors import ConfigError, UserError, say
from mebt.fsutil import seed_everything, write_json, write_text
from mebt.logs import ensure_logging
from mebt.train import checkpoint as train_checkpoint
from mebt.train.config import RunConfig, deepspeed_config, elastic_layout
from mebt.train.distributed import StopVote, gpu_memory, init_process_group, pick_device, resolve_env
from mebt.train.metrics_sync import HISTORY, PREFIX, history_points
from mebt.train.optim import lr_scheduler
from mebt.train.phase_timer import PhaseTimer
from mebt.train.plan import resolve_checkpointing
from mebt.train.resume_config import CHANGES_FILE, check_resume, record_changes
from mebt.train.run_lock import RunDirLock
from mebt.train.samples import SampleWriter
from mebt.train.tracking import Tracker, recorded_run_id
from mebt.train.train_state import LogWindow, TrainState

REQUEUE_EXIT_CODE = 75   # EX_TEMPFAIL: "try again"; launchers requeue on it

log = logging.getLogger(__name__)


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite: training stops before the bad weights are checkpointed."""


class MeBTLoss(nn.Module):
    """The model plus its loss, as the one module DeepSpeed wraps (ZeRO-3 gathers parameters on module calls)."""

    def __init__(self, model: MeBT, objective: ObjectiveConfig):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, codes, ctx_idx, tgt_idx, n_masked: int):
        features = self.model(codes, ctx_idx, tgt_idx, features_only=True)
        return chunked_masked_loss(features, self.model.head, codes, tgt_idx, self.objective.label_smoothing,
                                   self.objective.loss_chunk_rows, n_masked=n_masked)


class StopRequest:
    """Remembers SIGTERM/SIGUSR1/SIGUSR2 and Ctrl-C (SIGINT) so the loop can stop at a step boundary, after a
    checkpoint, instead of mid-step. A second Ctrl-C (a second later or more: a launcher forwards the
    terminal's own SIGINT, so each worker gets two at once) stops at once, without a checkpoint."""

    def __init__(self, main: bool, early: list[str] | None = None):
        # early: signals a launcher caught while the process was starting, honoured at the first step boundary
        self.signal, self._main, self._first_int = (early or [None])[0], main, None
        self._old = {s: signal.signal(s, self._handle)
                     for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._first_int is not None and now - self._first_int > 1.0:
                raise KeyboardInterrupt
            if self._first_int is None and self._main:
                log.warning("Ctrl-C: stopping after this step's checkpoint (Ctrl-C again to stop without one)")
            self._first_int = self._first_int or now
        self.signal = self.signal or signal.Signals(signum).name

    def restore(self):
        for s, handler in self._old.items():
            signal.signal(s, handler)


def _stream(loader):
    while True:   # the loader runs the rest of its current epoch per iteration and then moves to the next
        yield from loader


def _peak_memory_mib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux


class _Records:
    """Rank-local JSONL files that a resumed run trims back to its checkpoint (nothing counted twice)."""

    def __init__(self, path: Path, step: int, enabled: bool):
        self.path = path if enabled else None
        self.kept: list[dict] = []   # the records up to ``step``, as read
        if self.path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self.kept = [r for r in map(json.loads, path.read_text().splitlines() if path.exists() else [])
                     if r["step"] <= step]
        write_text(path, "".join(json.dumps(r) + "\n" for r in self.kept))

    def write(self, record: dict) -> None:
        self.write_all([record])

    def write_all(self, records: list[dict]) -> None:
        if self.path is not None and records:
            with open(self.path, "a") as f:
                f.write("".join(json.dumps(record) + "\n" for record in records))


class _Trace:
    """Per-micro-batch records (step, loss, acc1, clip keys) whose values stay on the device until ``flush``."""

    def __init__(self, records: _Records):
        self.records, self.rows = records, []

    def add(self, step: int, loss: torch.Tensor, acc1: torch.Tensor, keys) -> None:
        if self.records.path is not None:
            self.rows.append((step, torch.stack([loss, acc1]), keys))

    def flush(self) -> None:
        if self.rows:
            values = torch.stack([v for _, v, _ in self.rows]).tolist()   # one device read for all of them
            self.records.write_all([{"step": step, "loss": loss, "acc1": acc1, "keys": keys}
                                    for (step, _, keys), (loss, acc1) in zip(self.rows, values)])
            self.rows = []


def train(cfg: RunConfig, early_signals: list[str] | None = None) -> dict:
    """Train to ``cfg.train.steps`` (``early_signals``: stop signals a launcher caught before this started);
    the result's ``final_loss`` is the last logged ``train/loss`` (the mean
    over the last log window's steps and all ranks: the value of metrics.jsonl and MLflow, one definition)."""
    started_ms = int(time.time() * 1000)   # the MLflow run's start time, even when it is created later
    tc = cfg.train
    # 1. Everything that can be wrong is checked before a process group or a file exists.
    env = resolve_env()
    ensure_logging(env.rank)   # launcher workers and SLURM tasks start here, not in the CLI
    device = pick_device(tc.device, env.local_rank)
    run_dir = Path(tc.run_dir)
    resume = train_checkpoint.resume_tag(run_dir, cfg.resume_from, cfg.resume_fallback)
    saved = train_checkpoint.saved_meta(run_dir, resume)
    # On another number of processes than the checkpoint's, the clips per step stay the checkpoint's.
    layout = elastic_layout(cfg, saved, env.world_size)
    ds_config = deepspeed_config(layout, env.world_size, device.type)
    accum = ds_config["gradient_accumulation_steps"]
    loader = make_loader(layout.data, env.rank, env.world_size, expect_grid=tuple(cfg.model.latent_shape),
                         expect_vocab=cfg.model.vocab_size, accum=accum)
    samples = SampleWriter(cfg, device, active=env.rank == 0)   # checks the tokenizer against the model
    if tc.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        # Filling every torch.empty with NaN is a debugging aid, not determinism; DeepSpeed allocates
        # reduce buckets of hundreds of MB per step, which it would rewrite every time (5x slower here).
        torch.utils.deterministic.fill_uninitialized_memory = False
        torch.backends.cudnn.benchmark = False

    # 2. Process group, the run dir's lock (one training per run dir), model, engine.
    init_process_group(device)
    lock = RunDirLock(tc.run_dir, active=env.rank == 0)
    changes = []
    if saved is not None:   # before anything is built: a refused change costs nothing
        try:
            changes = check_resume(saved["config"], to_dict(cfg), cfg.allow_config_change, tc.run_dir, saved["step"])
        except ConfigError:
            lock.release()
            raise
    import deepspeed

    seed_everything(tc.seed)   # the same initial weights on every rank
    checkpointing, why = resolve_checkpointing(layout, env.world_size, gpu_memory(device))
    log.info(f"activation checkpointing {'on' if checkpointing else 'off'} ({why})")
    model = MeBT(replace(cfg.model, grad_checkpoint=checkpointing))
    n_params = model.num_params()   # before ZeRO-3 partitions the parameters into empty placeholders
    optimizer = cfg.optim.adamw(param_groups(model, cfg.optim.weight_decay))
    scheduler = lr_scheduler(cfg.optim, optimizer, tc.steps)
    engine, _, _, _ = deepspeed.initialize(model=MeBTLoss(model, cfg.objective).to(device),
                                           optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
                                           dist_init_required=False)
    state = TrainState(loader, device)
    seed_everything(tc.seed + 1 + env.rank)   # dropout differs per rank

    # 3. Resume.
    client = train_checkpoint.load(engine, run_dir, resume, saved, env.rank, env.world_size)
    if client is not None:
        state.load_state_dict(client)
        # A checkpoint written before the MLflow run existed (a loaded machine) has none: the run dir's record does.
        state.mlflow_run_id = state.mlflow_run_id or recorded_run_id(run_dir)
    main = env.rank == 0
    tags = {"world_size": env.world_size, "launcher": env.source}
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (run_dir / "config.yaml").exists():   # the first start's; later ones are in their checkpoints
            write_text(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        write_json(run_dir / "deepspeed_config.json", ds_config)
        history_of_changes = record_changes(run_dir, state.step, changes)
        if history_of_changes:
            tags["config_changes"] = history_of_changes
            shown = "; ".join(f"{c['key']} {c['saved']} -> {c['now']}" for c in changes)
            log.info(f"resumed with config changes ({CHANGES_FILE}): {shown}")
    trace = _Trace(_Records(run_dir / "trace" / f"rank{env.rank}.jsonl", state.step, tc.trace))
    history = _Records(run_dir / HISTORY, state.step, main)
    # The metrics logged before this start go along: what MLflow missed is sent, what it has is not resent.
    tracker = Tracker(cfg.mlflow, run_dir, active=main, run_id=state.mlflow_run_id, start_ms=started_ms,
                      params=flatten(to_dict(cfg)), tags=tags,
                      replay=history_points(history.kept) if client else None)
    for name in ("config.yaml", "deepspeed_config.json"):   # a no-op on ranks other than 0
        tracker.log_artifact(run_dir / name)
    log.info(f"MeBT {n_params / 1e6:.2f}M params, {env.world_size} process(es) ({env.source}) on "
             f"{device.type}, ZeRO-{cfg.deepspeed.zero_stage} {cfg.deepspeed.precision}, "
             f"{ds_config['train_batch_size']} clips/step" + (f", resumed at step {state.step}" if client else ""))
    log.debug(f"rank {env.rank} of {env.world_size} (local {env.local_rank}) on {device}, run dir {run_dir}")

    # 4. The loop: one iteration is one optimizer step of grad_accum micro-batches.
    peak = peak_flops_per_s(device, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.deepspeed.precision,
                                                                                     torch.float32))
    stop = StopRequest(main, early_signals)
    votes = StopVote()
    stream = _stream(loader)
    bar = tqdm(total=tc.steps, initial=state.step, desc="train", unit="step", disable=not main)
    preempted = None
    final_loss = None   # the last logged train/loss
    # The first step whose loss was not finite (0: none), kept on the device and read where the loop reads
    # anyway (log and checkpoint steps): NaN weights are never checkpointed, and no step waits for the host.
    bad_step = torch.zeros((), dtype=torch.int64, device=device)
    phases = PhaseTimer(device)

    def stop_if_not_finite() -> None:
        first = bad_step.clone()
        if env.world_size > 1:
            dist.all_reduce(first, op=dist.ReduceOp.MAX)
        if first.item():
            votes.close()
            bar.close()
            stop.restore()
            tracker.close(status="FAILED")
            lock.release()
            last = train_checkpoint.latest_tag(run_dir)
            raise NonFiniteLoss(f"the training loss is not finite since step {first.item()} (optim.lr "
                                f"{cfg.optim.lr:g}); stopped without saving weights after it (last checkpoint: "
                                f"{run_dir / train_checkpoint.CKPT_DIR / last if last else 'none'}); lower optim.lr, "
                                "set optim.grad_clip or check the data, then run again to resume from that checkpoint")

    while state.step < tc.steps:
        step_loss = torch.zeros((), dtype=torch.float64, device=device)
        # Clip length and mask ratio from (seed, step): the same on every rank and micro-batch, nothing to save.
        shared_seed = hash((tc.seed, state.step)) & (2 ** 63 - 1)
        for _ in range(accum):
            t = time.perf_counter()
            batch = next(stream)
            state.window.wait += time.perf_counter() - t
            codes = batch["codes"].to(device, non_blocking=True)
            # Each sample's masked positions from its slot in the epoch: the same whichever rank takes it.
            masks = sample_masks(cfg.objective, len(codes), cfg.model.latent_shape, state.step,
                                 shared=torch.Generator().manual_seed(shared_seed),
                                 sample_seeds=slot_seeds(tc.seed, batch["epoch"], batch["sample_id"]))
            marks = [phases.mark()]
            loss, metrics = engine(codes, masks.ctx_idx.to(device), masks.tgt_idx.to(device), masks.n_masked)
            marks.append(phases.mark())
            engine.backward(loss)
            marks.append(phases.mark())
            engine.step()
            phases.add(marks + [phases.mark()])
            loss = loss.detach().double()
            step_loss += loss
            state.window.acc1 += metrics["acc1"] / accum
            n_ctx, n_tgt = masks.ctx_idx.shape[1], masks.tgt_idx.shape[1]
            state.window.flops += mebt_train_flops(cfg.model, n_ctx, n_tgt) * len(codes)
            state.window.tokens += (n_ctx + n_tgt) * len(codes)   # fewer than the grid under a length curriculum
            trace.add(state.step + 1, loss, metrics["acc1"], batch["key"])
        state.step += 1
        phases.step()
        bad_step = torch.where((bad_step == 0) & ~torch.isfinite(step_loss), state.step, bad_step)
        state.window.add_step(step_loss / accum)
        bar.update(1)

        if state.step % tc.log_every == 0 or state.step == tc.steps:
            record = _log_record(state.window, state.step, engine, env.world_size, ds_config["train_batch_size"],
                                 device, peak)
            record.update(phases.collect())   # this process's forward / backward / optimizer seconds per step
            trace.flush()
            history.write(record)
            final_loss = record["loss"]
            tracker.log_metrics({f"{PREFIX}{k}": v for k, v in record.items() if k != "step"}, state.step)
            bar.set_postfix(loss=f"{record['loss']:.3f}", acc1=f"{record['acc1']:.3f}")
            log.info(f"step {state.step}/{tc.steps}: loss {record['loss']:.4f}, acc1 {record['acc1']:.4f}, "
                     f"lr {record['lr']:.3g}, {record['samples_per_s']:.1f} clips/s, "
                     f"{record['step_time_s']:.3f} s/step (data wait {record['data_wait_s'] * 1000:.1f} ms, forward "
                     f"{record['forward_s'] * 1000:.0f} / backward {record['backward_s'] * 1000:.0f} / optimizer "
                     f"{record['optimizer_s'] * 1000:.0f} ms)"
                     + (f", MFU {record['mfu']:.1%}" if "mfu" in record else ""))
            state.new_window()
            stop_if_not_finite()

        if tc.sample_every and state.step % tc.sample_every == 0 and state.step < tc.steps:
            samples.write(engine.module.model, state.step, tracker)
        requested = votes.poll(stop.signal is not None)
        if state.step % tc.ckpt_every == 0 or state.step == tc.steps or requested:
            trace.flush()   # every record up to the checkpoint is on disk before it exists
            stop_if_not_finite()
            last = state.step == tc.steps or requested
            state.mlflow_run_id = state.mlflow_run_id or _run_id(tracker, main, wait_s=30.0 if last else 2.0)
            train_checkpoint.save(engine, state, run_dir, cfg, tc.keep_last)
        if requested:
            preempted = stop.signal or "peer"
            break
    votes.close()
    bar.close()
    stop.restore()
    if preempted is None:
        samples.write(engine.module.model, state.step, tracker)
    sent = tracker.close(status="KILLED" if preempted else "FINISHED")
    lock.release()
    result = {"step": state.step, "final_loss": final_loss,
              "run_dir": str(run_dir), "preempted": preempted,
              "mlflow_run_id": state.mlflow_run_id or tracker.run_id, "tracking": sent,
              "checkpoint": str(run_dir / train_checkpoint.CKPT_DIR / train_checkpoint.tag_of(state.step))}
    if main:
        print(json.dumps(result))
        if preempted:
            say(stop_line(result))
    return result


def stop_line(result: dict) -> str:
    """The one line a training stopped by a signal or Ctrl-C prints: what was saved and how to resume."""
    return (f"mebt: stopped by {result['preempted']} at step {result['step']}; checkpoint saved in "
            f"{result['checkpoint']}; run the same command to resume (exit code {REQUEUE_EXIT_CODE} asks a "
            "launcher to requeue)")


def interrupted_line(run_dir: str | Path) -> str:
    """The one line of a training interrupted between checkpoints (a second Ctrl-C, or one before the loop)."""
    tag = train_checkpoint.latest_tag(Path(run_dir))
    if tag is None:
        return f"mebt: interrupted before the first checkpoint of {run_dir}; the same command starts it again"
    return (f"mebt: interrupted; the last checkpoint is {Path(run_dir) / train_checkpoint.CKPT_DIR / tag}: run the "
            "same command to resume from it")


def _log_record(window: LogWindow, step: int, engine, world_size: int, clips_per_step: int, device, peak) -> dict:
    """The metrics of the steps in ``window``, averaged over them and the ranks: the one device read and
    all-reduce of a log step."""
    seconds = time.perf_counter() - window.start
    # On the training device: nccl reduces only CUDA tensors.
    sums = torch.stack([window.loss, window.acc1, torch.tensor(window.flops, dtype=torch.float64, device=device),
                        torch.tensor(window.tokens, dtype=torch.float64, device=device)])
    if world_size > 1:
        dist.all_reduce(sums)
    loss, acc1, flops, tokens = sums.tolist()
    n, timed = window.steps, window.timed   # timed: this process's steps (after a restart, fewer)
    record = {"step": step, "loss": loss / n / world_size, "acc1": acc1 / n / world_size,
              "lr": float(engine.get_lr()[0]), "samples_per_s": timed * clips_per_step / seconds,
              "tokens_per_s": tokens / seconds, "step_time_s": seconds / timed, "data_wait_s": window.wait / timed,
              "peak_memory_mib": _peak_memory_mib(device)}
    achieved = mfu(flops / seconds / world_size, peak)
    if achieved is not None:
        record["mfu"] = achieved
    return record


def _run_id(tracker: Tracker, main: bool, wait_s: float) -> str | None:
    """The MLflow run id to store in the checkpoint. Only rank 0 writes the client state and ``mebt.json``
    (and every rank reads them back on resume), so only rank 0 needs it. The run is created in the
    background (a fresh sqlite store takes seconds to set up): a periodic checkpoint gives it a moment,
    the last one (or one for a stop signal) waits longer, since an evaluation of that checkpoint logs into
    the run it names."""
    if not main:
        return None
    if tracker.run_id is None:
        tracker.flush(timeout=wait_s)
    return tracker.run_id
