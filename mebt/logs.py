"""Logging for mebt's processes: one stderr handler whose lines carry the rank, the seconds since the
process started and the level::

    [rank 0 +12.3s INFO] mebt.train.loop: step 100/1600: loss 1.2977, acc1 0.6156, ...

Library modules log through ``logging.getLogger(__name__)``; only ``setup_logging`` installs a handler. It
goes on the root logger, so other libraries' warnings get the same prefix; mebt's own packages log at the
chosen level, everything else at WARNING. Ranks above 0 show only warnings and errors unless the level is
DEBUG (N processes saying the same thing is noise, as in torchtitan and DeepSpeed). Records are written
with ``tqdm.write``, which clears the progress bars on the terminal and redraws them below the line, so the
two never share a line; ``warnings.warn`` goes the same way (one line: category and message, plus the
file for other libraries' warnings). Stdout is left to command results (JSON, tables, summaries) that
scripts parse.

The level is exported as ``MEBT_LOG_LEVEL``: processes this one starts (the workers of `mebt launch
local`, SLURM tasks, spawned preprocessing workers) read it through ``default_level``.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings

from tqdm import tqdm

from mebt.errors import ConfigError

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LEVEL_ENV = "MEBT_LOG_LEVEL"
PACKAGES = ("mebt", "data_pipeline", "launchers", "benchmarks")


def default_level() -> str:
    """The level a process uses when nobody chose one: its parent's (``MEBT_LOG_LEVEL``), else INFO."""
    return os.environ.get(LEVEL_ENV, "INFO")


class RankFormatter(logging.Formatter):
    """``[rank R +S.Ss LEVEL] logger: message``; S counts from the logging module's import (process start)."""

    def __init__(self, rank: int = 0):
        super().__init__("%(message)s")
        self.rank = rank

    def format(self, record: logging.LogRecord) -> str:
        return (f"[rank {self.rank} +{record.relativeCreated / 1000:.1f}s {record.levelname}] {record.name}: "
                f"{super().format(record)}")


class RankFilter(logging.Filter):
    """Rank 0 passes everything; other ranks only WARNING and above, unless ``everything`` (DEBUG)."""

    def __init__(self, rank: int = 0, everything: bool = False):
        super().__init__()
        self.rank, self.everything = rank, everything

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rank == 0 or self.everything or record.levelno >= logging.WARNING


class TqdmHandler(logging.Handler):
    """Writes to the current ``sys.stderr`` (resolved per record, so redirections apply) through tqdm."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` as one log record: a bare write to stderr would glue to a progress bar."""
    where = "" if any(f"/{p}/" in filename for p in PACKAGES) else f" ({filename}:{lineno})"
    logging.getLogger("py.warnings").warning(f"{category.__name__}: {message}{where}")


def _handler() -> TqdmHandler | None:
    return next((h for h in logging.getLogger().handlers if isinstance(h, TqdmHandler)), None)


def _env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _set_rank(handler: TqdmHandler, rank: int, everything: bool) -> None:
    handler.setFormatter(RankFormatter(rank))
    handler.filters = [RankFilter(rank, everything)]


def setup_logging(level: str = "INFO", rank: int | None = None) -> None:
    """Send log records to stderr with the rank (``RANK`` when None), elapsed time and level; calling it
    again changes the level and rank of the same handler."""
    name = str(level).upper()
    if name not in LEVELS:
        raise ConfigError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}")
    handler = _handler()
    if handler is None:
        handler = TqdmHandler()
        logging.getLogger().addHandler(handler)
    _set_rank(handler, _env_rank() if rank is None else rank, name == "DEBUG")
    numeric = getattr(logging, name)
    logging.getLogger().setLevel(max(numeric, logging.WARNING))
    for package in PACKAGES:
        logging.getLogger(package).setLevel(numeric)
    warnings.showwarning = _show_warning
    os.environ[LEVEL_ENV] = name


def adopt_library_logger(name: str, env_level: str | None = None) -> None:
    """Send a library that installs its own stderr handler (mlflow) through this module's handler, at
    WARNING unless its own ``env_level`` variable chose a level: its lines get the rank prefix and never
    glue to a progress bar. Does nothing when logging is not set up here (mebt used as a library)."""
    if _handler() is None:
        return
    logger = logging.getLogger(name)
    logger.handlers, logger.propagate = [], True
    if not (env_level and os.environ.get(env_level)):
        logger.setLevel(logging.WARNING)


def ensure_logging(rank: int | None = None) -> None:
    """For processes that start training without the CLI (launcher workers, SLURM tasks, torchrun):
    ``setup_logging(default_level(), rank)`` unless logging is set up already (by ``setup_logging`` or by
    an application's own handlers); a given ``rank`` replaces the one ``setup_logging`` guessed."""
    handler = _handler()
    if handler is None and not logging.getLogger().handlers:
        setup_logging(default_level(), rank)
    elif handler is not None and rank is not None:
        _set_rank(handler, rank, handler.filters[0].everything)
