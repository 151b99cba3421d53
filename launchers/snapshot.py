"""The code a SLURM training job runs: a copy of this checkout's packages made at submission.

A queued or requeued job would otherwise import whatever the checkout holds when it starts: a ``git pull``
or an edit while a job waits in the queue would silently change a running experiment. ``snapshot_code``
copies the packages (``mebt``, ``data_pipeline``, ``launchers``, ``benchmarks``: their Python files and the
configs and tables they read) into ``RUN_DIR/slurm/code-<sha>``, named by the hash of their contents, so
identical code is copied once. The job is submitted from inside that folder (``working_dir``; submitit's
``RsyncSnapshot`` does the same): SLURM starts the job there and Python imports the packages from the
working directory first, for every start of the job, requeues included. The job's config is resolved
before submission and travels pickled with it; ``absolute_paths`` makes its paths independent of the
working directory.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mebt", "data_pipeline", "launchers", "benchmarks")
SUFFIXES = {".py", ".yaml", ".yml", ".json", ".sh", ".tsv", ".txt"}


def _files() -> list[Path]:
    return sorted(f for package in PACKAGES for f in (ROOT / package).rglob("*")
                  if f.is_file() and f.suffix in SUFFIXES and "__pycache__" not in f.parts)


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def snapshot_code(out_dir: str | Path) -> dict:
    """Copy the packages into ``OUT_DIR/code-<sha>`` (once per content); returns what ``launch.json`` records:
    the folder, the content hash, the file count and the checkout's git commit (and whether it had changes)."""
    files = _files()
    digest = hashlib.sha256()
    for f in files:
        digest.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes() + b"\0")
    sha = digest.hexdigest()
    dest = Path(out_dir) / f"code-{sha[:12]}"
    if not dest.is_dir():
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        for f in files:
            target = tmp / f.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)
        tmp.rename(dest)
    commit = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--", *PACKAGES)) if commit else None
    return {"path": str(dest), "sha256": sha, "files": len(files), "git_commit": commit, "git_dirty": dirty}


@contextlib.contextmanager
def working_dir(path: str | Path):
    """Run the block in ``path`` (a job submitted here starts here)."""
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def _absolute(value: str | None) -> str | None:
    if not value or "://" in value or value.startswith("pipe:"):
        return value
    return str(Path(value).expanduser().absolute())


def absolute_paths(cfg):
    """A RunConfig whose local paths (dataset, run dir, tokenizer) no longer depend on the working directory."""
    data = dataclasses.replace(cfg.data, **{k: _absolute(getattr(cfg.data, k)) for k in ("data_dir", "meta_dir",
                                                                                          "cache_dir")})
    train = dataclasses.replace(cfg.train, run_dir=_absolute(cfg.train.run_dir), tokenizer=_absolute(cfg.train.tokenizer))
    return dataclasses.replace(cfg, data=data, train=train)
