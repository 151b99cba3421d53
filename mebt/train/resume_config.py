"""Config safety on resume: a restarted run compares its resolved config with the one its checkpoint was
trained with, key by key.

A change that alters the experiment (the model, objective, optimizer, DeepSpeed setup, the batches'
content and order, seeds) is refused with one line naming each key and both values, unless the key is
named in ``allow_config_change`` (``--allow-config-change KEY``). Keys that only change how the run is
driven may change freely: the step budget, log/checkpoint/sample cadence, MLflow settings, sampling of
the preview videos, and how the data is fetched (its content is checked by the loader's own state).
Every accepted change is recorded: a line in ``RUN_DIR/config_changes.jsonl`` and the MLflow tag
``config_changes``. ``config.yaml`` keeps the config of the first start.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from mebt.config import flatten
from mebt.errors import ConfigError

CHANGES_FILE = "config_changes.jsonl"
FREE_KEYS = ("train.steps", "train.run_dir", "train.log_every", "train.ckpt_every", "train.sample_every",
             "train.num_samples", "train.keep_last", "train.trace", "train.tokenizer", "train.device",
             "allow_config_change", "resume_from", "resume_fallback")
FREE_SECTIONS = ("mlflow.", "sampling.")
FREE_DATA_IO = ("data.data_dir", "data.meta_dir", "data.num_workers", "data.prefetch_factor", "data.pin_memory",
                "data.timeout_s", "data.retries", "data.retry_backoff_s", "data.max_shards_in_memory",
                "data.cache_dir", "data.verify", "data.on_corrupt")


# Keys no --allow-config-change can change, and why.
FIXED = {"deepspeed.zero_stage": "DeepSpeed 0.19 loads a checkpoint only into an engine of its own ZeRO stage"}


def is_free(key: str) -> bool:
    return key in FREE_KEYS or key in FREE_DATA_IO or key.startswith(FREE_SECTIONS)


def config_changes(saved: dict, current: dict) -> list[dict]:
    """``{key, saved, now}`` for every flattened key whose value differs (a key one side lacks is None)."""
    old, new = flatten(saved), flatten(current)
    return [{"key": k, "saved": old.get(k), "now": new.get(k)} for k in sorted(set(old) | set(new))
            if json.dumps(old.get(k), default=str) != json.dumps(new.get(k), default=str)]


def check_resume(saved: dict, current: dict, allowed: list[str], run_dir: str | Path, step: int) -> list[dict]:
    """The accepted changes (each marked ``free`` or ``allowed``), or a ConfigError naming the refused ones."""
    changes = config_changes(saved, current)
    unknown = sorted(set(allowed) - set(flatten(current)))
    if unknown:
        raise ConfigError(f"--allow-config-change names unknown config keys: {', '.join(unknown)}")
    for c in changes:
        if c["key"] in FIXED:
            raise ConfigError(f"resuming '{run_dir}' at step {step}: {c['key']} cannot change (saved {c['saved']}, now "
                              f"{c['now']}): {FIXED[c['key']]}; resume with {c['key']}={c['saved']} or start a new "
                              "train.run_dir")
    refused = [c for c in changes if not is_free(c["key"]) and c["key"] not in allowed]
    if refused:
        shown = ", ".join(f"{c['key']} (saved {c['saved']}, now {c['now']})" for c in refused)
        raise ConfigError(f"resuming '{run_dir}' at step {step} with a changed config: {shown}; these change the "
                          "experiment: start a new train.run_dir, or accept them with --allow-config-change KEY "
                          "(recorded in the run)")
    return [{**c, "how": "free" if is_free(c["key"]) else "allowed"} for c in changes]


def record_changes(run_dir: str | Path, step: int, changes: list[dict]) -> str:
    """Append the changes of this start to ``config_changes.jsonl``; returns every change so far, one line each
    (``step N: key saved -> now``), for the MLflow tag."""
    path = Path(run_dir) / CHANGES_FILE
    if changes:
        with open(path, "a") as f:
            f.write(json.dumps({"step": step, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "changes": changes},
                               default=str) + "\n")
    if not path.is_file():
        return ""
    lines = []
    for record in map(json.loads, path.read_text().splitlines()):
        lines += [f"step {record['step']}: {c['key']} {c['saved']} -> {c['now']} ({c['how']})"
                  for c in record["changes"]]
    return "\n".join(lines)
