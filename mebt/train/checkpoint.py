"""DeepSpeed checkpoints of a run directory: save on every rank, a ``latest`` pointer written last, the
last k kept, automatic resume, and export to one fp32 model file that loads without DeepSpeed.

Layout: ``RUN_DIR/checkpoints/global_stepN/`` (DeepSpeed's files, plus ``mebt.json``: the resolved config
and step, readable without unpickling anything) and ``RUN_DIR/checkpoints/latest`` (the tag, DeepSpeed's
own convention, so its ``zero_to_fp32`` tooling works on our directories). DeepSpeed writes its client
state from one rank only, so every rank's loader position and RNG states are gathered into it first.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import pickle
import re
import shutil
import zipfile
from pathlib import Path

import torch

from mebt.config import from_dict, to_dict
from mebt.core.model import MeBTConfig
from mebt.core.model_file import CheckpointError, first_line, model_from_state_dict, save_model
from mebt.errors import WriteError
from mebt.fsutil import write_bytes
from mebt.train.distributed import all_gather_object, barrier, quiet_deepspeed
from mebt.train.tracking import recorded_tracking_uri
from mebt.train.train_state import for_rank, merge

log = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
LATEST = "latest"
META = "mebt.json"
UNIVERSAL = "universal"   # checkpoints converted for another number of processes
_TAG = re.compile(r"global_step(\d+)$")


def tag_of(step: int) -> str:
    return f"global_step{step}"


@contextlib.contextmanager
def weights_only_loads():
    """Inside the block every ``torch.load`` reads weights only: DeepSpeed's ``load_checkpoint``,
    ``zero_to_fp32`` and ``ds_to_universal`` call ``torch.load(weights_only=False)`` on the files of a
    checkpoint, which would run any code a crafted file names. Admitted besides tensors and plain
    containers: the DeepSpeed classes its checkpoint files hold (measured on ZeRO 0-3, fp32 and bf16,
    deepspeed 0.19: a loss scaler, the ZeRO stage enum and a fragment address)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    original = torch.load
    allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(allowed):
            return original(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def refused(e: pickle.UnpicklingError) -> str:
    """What to say of a checkpoint file ``weights_only_loads`` refused."""
    name = re.search(r"GLOBAL ([\w.]+)", str(e))
    return (f"holds a file that is not a plain DeepSpeed checkpoint (it names {name.group(1) if name else 'an object'}"
            " that a checkpoint never holds); refused without running it: load only checkpoints from a known source")


def vet(tag_dir: Path) -> None:
    """Read the pickles of every file of a tag weights-only (tensor data memory-mapped, not read): a refused
    file stops every rank here, each with the same line, rather than one rank inside a collective of
    DeepSpeed's loading while the others wait for it."""
    for path in sorted(tag_dir.glob("*.pt")):
        try:
            with weights_only_loads():
                torch.load(path, map_location="cpu", mmap=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"checkpoint '{tag_dir}' {refused(e)}") from None


def _cannot_write(ckpt_dir: Path, engine) -> str | None:
    """Why this process cannot write a checkpoint into ``ckpt_dir`` (None: it can): a folder it cannot create
    or write (a read-only file system), or less free space than the last checkpoint took (before the first:
    16 bytes per parameter, fp32 weights, master copy and Adam's two moments)."""
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return str(WriteError.of(ckpt_dir, e)).split(";")[0]
    if not os.access(ckpt_dir, os.W_OK):
        return f"'{ckpt_dir}' is not writable (a read-only file system or its permissions; EROFS/EACCES)"
    done = [t for t in tag_dirs(ckpt_dir) if (t / META).is_file()]
    if done:
        need = sum(f.stat().st_size for f in done[-1].iterdir() if f.is_file())
    else:
        need = 16 * sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    free = shutil.disk_usage(ckpt_dir).free
    if free < need:
        return (f"{free / 2 ** 20:.1f} MiB free on the file system of '{ckpt_dir}' and a checkpoint takes about "
                f"{need / 2 ** 20:.1f} MiB (ENOSPC)")
    return None


def save(engine, state, run_dir: Path, cfg, keep_last: int) -> Path:
    """Checkpoint ``engine`` and every rank's ``TrainState`` at ``state.step``; ``latest`` moves to it only once
    every rank has finished writing. ``cfg`` is the run's config as given (an elastic resume's adapted batch
    layout is recorded as ``global_batch``)."""
    ckpt_dir = Path(run_dir) / CKPT_DIR
    tag = tag_of(state.step)
    # Every rank says whether it can write before any does: a rank failing inside DeepSpeed's saving would
    # leave the others waiting in its collectives.
    gathered = all_gather_object((state.state_dict(), _cannot_write(ckpt_dir, engine)))
    problem = next((p for _, p in gathered if p), None)
    if problem:
        last = latest_tag(run_dir)
        raise CheckpointError(f"cannot write checkpoint {tag}: {problem}; the last checkpoint "
                              f"({last or 'none'}) and 'latest' are unchanged; free space or move train.run_dir, "
                              "then run the same command to resume")
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=merge([g for g, _ in gathered]),
                               save_latest=False)
    except OSError as e:   # the disk filled up while writing: 'latest' still names the last complete one
        raise WriteError.of(ckpt_dir / tag, e) from None
    barrier()
    if engine.global_rank == 0:
        meta = {"step": state.step, "config": to_dict(cfg), "world_size": len(gathered),
                "global_batch": engine.train_batch_size(), "zero_stage": engine.zero_optimization_stage(),
                "mlflow_run_id": state.mlflow_run_id}
        write_bytes(ckpt_dir / tag / META, json.dumps(meta, indent=2).encode())
        write_bytes(ckpt_dir / LATEST, tag.encode())
        _prune(ckpt_dir, keep_last, keep=tag)
    barrier()
    return ckpt_dir / tag


def tag_dirs(ckpt_dir: Path) -> list[Path]:
    """The ``global_stepN`` folders of a checkpoints dir, oldest step first (finished or not)."""
    found = [(int(m.group(1)), p) for p in Path(ckpt_dir).glob("global_step*") if (m := _TAG.match(p.name))]
    return [p for _, p in sorted(found) if p.is_dir()]


def _prune(ckpt_dir: Path, keep_last: int, keep: str) -> None:
    for path in tag_dirs(ckpt_dir)[:-keep_last]:
        if path.name != keep:
            shutil.rmtree(path, ignore_errors=True)
    for path in tag_dirs(ckpt_dir / UNIVERSAL):   # conversions of pruned tags
        if not (ckpt_dir / path.name).is_dir():
            shutil.rmtree(path, ignore_errors=True)


def latest_tag(run_dir: Path) -> str | None:
    pointer = Path(run_dir) / CKPT_DIR / LATEST
    return pointer.read_text().strip() if pointer.is_file() else None


def _read_meta(tag_dir: Path) -> dict:
    meta = json.loads((tag_dir / META).read_text())
    for key in ("step", "config", "world_size"):
        meta[key]
    return meta


def tag_problem(tag_dir: Path) -> str | None:
    """Why a checkpoint tag cannot be resumed (missing, or a file missing or cut short), or None. Cheap: a
    ``torch.save`` file is a zip archive, whose directory at the end is gone when the file is truncated."""
    if not tag_dir.is_dir():
        return "it does not exist"
    try:
        meta = _read_meta(tag_dir)
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"'{tag_dir / META}' is missing or unreadable ({first_line(e)})"
    world, stage = meta["world_size"], meta.get("zero_stage", meta["config"].get("deepspeed", {}).get("zero_stage"))
    if stage == 3:
        files = [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world)]
    else:
        files = ["mp_rank_00_model_states.pt"]
    if stage:
        optim = sorted(p.name for p in tag_dir.glob("*optim_states.pt"))
        if len(optim) != world:
            return f"it has {len(optim)} optimizer state files for {world} processes (some were never written)"
        files += optim
    for name in files:
        try:
            zipfile.ZipFile(tag_dir / name).close()
        except FileNotFoundError:
            return f"'{tag_dir / name}' is missing"
        except (OSError, zipfile.BadZipFile):
            return f"'{tag_dir / name}' is truncated or damaged"
    return None


def _step(tag: str) -> int:
    m = _TAG.match(tag)
    return int(m.group(1)) if m else -1


def resume_tag(run_dir: Path, resume_from: str | None = None, fallback: bool = False) -> str | None:
    """The tag a run resumes from: ``resume_from``, else the one ``latest`` names; None: a fresh run. A tag
    that cannot be resumed is refused in one line that names the broken file and the previous complete tag
    (``--resume-from global_stepN``), or with ``fallback`` that tag is taken, with a warning."""
    ckpt_dir = Path(run_dir) / CKPT_DIR
    tag = resume_from or latest_tag(run_dir)
    if tag is None:
        return None
    problem = tag_problem(ckpt_dir / tag)
    if problem is None:
        return tag
    earlier = [p.name for p in reversed(tag_dirs(ckpt_dir)) if _step(p.name) < _step(tag) or _step(tag) < 0]
    previous = next((t for t in earlier if tag_problem(ckpt_dir / t) is None), None)
    if fallback and previous:
        log.warning(f"cannot resume from '{ckpt_dir / tag}': {problem}; resuming from {previous} (--resume-fallback)")
        return previous
    hint = (f"resume from the previous complete one with --resume-from {previous} (--resume-fallback does so "
            "automatically)" if previous else "there is no earlier complete checkpoint: start a new train.run_dir")
    raise CheckpointError(f"cannot resume from '{ckpt_dir / tag}': {problem}; {hint}")


def saved_meta(run_dir: Path, tag: str | None = None) -> dict | None:
    """``mebt.json`` of a checkpoint (default: the one ``latest`` names): step, resolved config, process count,
    clips per step; read before anything is built; None: no checkpoint."""
    tag = tag or latest_tag(run_dir)
    if tag is None:
        return None
    path = Path(run_dir) / CKPT_DIR / tag / META
    try:
        return _read_meta(path.parent)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"'{path}' is unreadable ({first_line(e)}); point '{Path(run_dir) / CKPT_DIR / LATEST}' "
                              "at an older tag or start a new train.run_dir") from None


def load(engine, run_dir: Path, tag: str | None, meta: dict | None, rank: int, world_size: int) -> dict | None:
    """Restore checkpoint ``tag`` (``resume_tag``; ``meta``: its ``saved_meta``) into ``engine``; returns this
    rank's ``TrainState.state_dict()`` (None: no tag, a fresh run).

    A checkpoint of another number of processes is resumed through DeepSpeed's universal checkpoint: rank 0
    converts it once (``checkpoints/universal/TAG``; ZeRO's partitioned fp32 weights and Adam moments
    become one file per parameter) and every rank loads its new partition from that (``train_state.for_rank``
    says what becomes of the per-rank parts).
    """
    if tag is None:
        return None
    ckpt_dir = Path(run_dir) / CKPT_DIR
    saved_world = meta["world_size"]
    vet(ckpt_dir / tag)   # every rank, every file: a refusal is the same on all ranks, before any collective
    try:
        if saved_world == world_size or engine.zero_optimization_stage() == 0:   # ZeRO-0: nothing partitioned
            with weights_only_loads():
                path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_strict=True)
        else:
            from deepspeed.utils import logger as deepspeed_logger

            universal = _universal(ckpt_dir, tag, rank)
            engine._config.load_universal_checkpoint = True   # read by load_checkpoint only
            level = deepspeed_logger.level
            deepspeed_logger.setLevel(logging.ERROR)   # "MPU is not provided, setting tp size to 1": no TP here
            try:
                with weights_only_loads():
                    path, client = engine.load_checkpoint(str(universal.parent), tag=tag, load_module_strict=True)
            finally:
                engine._config.load_universal_checkpoint = False
                deepspeed_logger.setLevel(level)
            if path is not None:
                _restore_group_settings(engine, universal)
    except pickle.UnpicklingError as e:   # weights_only_loads refused a global: nothing of it ran
        raise CheckpointError(f"checkpoint '{ckpt_dir / tag}' {refused(e)}") from None
    if path is None:
        raise CheckpointError(f"checkpoint '{ckpt_dir / tag}' could not be loaded (incomplete or from another "
                              "model); delete it or point 'latest' at an older tag")
    if saved_world != world_size:
        log.info(f"resumed {ckpt_dir / tag} (written by {saved_world} processes) on {world_size}")
    return for_rank(client, rank, world_size)


def _universal(ckpt_dir: Path, tag: str, rank: int) -> Path:
    """``checkpoints/universal/TAG``: the universal form of a tag, converted by rank 0 on first use (into a
    temporary name, then renamed, so a half-written conversion is never loaded)."""
    out = ckpt_dir / UNIVERSAL / tag
    if rank == 0 and not out.is_dir():
        from deepspeed.checkpoint import ds_to_universal

        tmp = out.with_name(f".{tag}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        args = argparse.Namespace(input_folder=str(ckpt_dir / tag), output_folder=str(tmp), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=True)   # ZeRO checkpoints lack its universal_checkpoint_info
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed), weights_only_loads():   # prints would mix with a command's output
                ds_to_universal.main(args)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"checkpoint '{ckpt_dir / tag}' {refused(e)}") from None
        except (OSError, ValueError, KeyError, RuntimeError, AssertionError) as e:
            raise CheckpointError(f"cannot convert '{ckpt_dir / tag}' for another number of processes: "
                                  f"{first_line(e)}") from None
        log.debug(printed.getvalue().strip())
        tmp.rename(out)
    barrier()
    return out


def _restore_group_settings(engine, universal: Path) -> None:
    """Two repairs after DeepSpeed's (0.19) ZeRO-3 universal load, without which the first update after the
    resume differs: it gives every parameter group the first group's hyperparameters (the decayed group's
    weight decay lands on norms and biases), so each group's saved ones are put back; and it gives every
    group's Adam state one shared ``step`` tensor, which AdamW then advances once per group per step."""
    if engine.zero_optimization_stage() != 3:
        return
    from mebt.safe_unpickle import load_torch_file

    saved = load_torch_file(universal / "zero" / "optimizer_state.pt")["param_groups"]
    for group, kept in zip(engine.optimizer.param_groups, saved):
        group.update({k: v for k, v in kept.items() if k != "params"})
    for state in engine.optimizer.optimizer.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


def resolve_checkpoint(path: str | Path) -> tuple[Path, str]:
    """(checkpoints dir, tag) from a run dir or its checkpoints dir (their ``latest``), or one tag directory."""
    path = Path(path)
    if (path / META).is_file():
        return path.parent, path.name
    for ckpt_dir in (path / CKPT_DIR, path):
        pointer = ckpt_dir / LATEST
        if pointer.is_file() and (ckpt_dir / pointer.read_text().strip() / META).is_file():
            return ckpt_dir, pointer.read_text().strip()
    raise CheckpointError(f"no mebt training checkpoint at '{path}' (give a run dir, its checkpoints dir or a "
                          "global_stepN dir written by mebt train)")


def consolidated_model(checkpoint: str | Path):
    """(fp32 MeBT, checkpoint meta, tag dir) from a run dir, its checkpoints dir or a tag dir; ZeRO 0-3.

    DeepSpeed's checkpoint files are pickles; they are read weights-only (``weights_only_loads``), so a crafted
    file is refused instead of running code.
    """
    ckpt_dir, tag = resolve_checkpoint(checkpoint)
    meta = json.loads((ckpt_dir / tag / META).read_text())
    cfg = from_dict(MeBTConfig, meta["config"]["model"], prefix="model.")
    quiet_deepspeed("cuda" if torch.cuda.is_available() else "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        if any((ckpt_dir / tag).glob("*optim_states.pt")):   # ZeRO 1-3: fp32 master weights, partitioned
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed), weights_only_loads():   # prints would mix with a command's JSON
                state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
            log.debug(printed.getvalue().strip())
        else:   # ZeRO 0 keeps whole module weights (in the training precision) in the model states file
            with weights_only_loads():
                state = torch.load(ckpt_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu")["module"]
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"checkpoint '{ckpt_dir / tag}' {refused(e)}") from None
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"cannot consolidate '{ckpt_dir / tag}': {first_line(e)}") from None
    prefix = "model."
    weights = {k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)}
    return model_from_state_dict(cfg, weights, f"checkpoint '{ckpt_dir / tag}'"), meta, ckpt_dir / tag


def export(checkpoint: str | Path, out: str | Path) -> dict:
    """Consolidate a ZeRO 0-3 checkpoint into one fp32 mebt model file (loads with ``load_model``).

    The output is weights-only loadable; the checkpoint's files are read weights-only too (see
    ``consolidated_model``).
    """
    model, meta, tag_dir = consolidated_model(checkpoint)
    # The run's MLflow store travels with the file: `mebt eval` of it logs there even once the run dir is gone.
    save_model(model, out, extra={"step": meta["step"], "source": str(tag_dir.resolve()), "tag": tag_dir.name,
                                  "mlflow_run_id": meta.get("mlflow_run_id"), "run_config": json.dumps(meta["config"]),
                                  "mlflow_tracking_uri": recorded_tracking_uri(tag_dir.parent.parent)})
    return {"out": str(out), "step": meta["step"], "params": model.num_params(), "tag": tag_dir.name}
