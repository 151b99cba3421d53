"""mebt.logs: the rank-aware format, rank > 0 filtering, idempotent set-up, records next to progress bars,
and the rank in a real 2-process training's log lines."""
import logging
import os
import re
import subprocess
import sys
import warnings
from contextlib import contextmanager

import pytest
from tqdm import tqdm

from mebt.errors import ConfigError
from mebt.logs import (
    LEVEL_ENV,
    PACKAGES,
    RankFilter,
    RankFormatter,
    TqdmHandler,
    ensure_logging,
    setup_logging,
)
from mebt.train.distributed import free_port
from tests.helpers.engine import overrides

log = logging.getLogger("mebt.train.loop")


@pytest.fixture
def bare_logging(monkeypatch):
    """The root logger, with mebt's handler removed and the levels and MEBT_LOG_LEVEL restored afterwards."""
    root = logging.getLogger()
    levels = {name: logging.getLogger(name).level for name in ("", *PACKAGES)}
    monkeypatch.delenv(LEVEL_ENV, raising=False)
    monkeypatch.delenv("RANK", raising=False)
    yield root
    for handler in ours(root):
        root.removeHandler(handler)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


@contextmanager
def without_handlers(root):
    """No handler at all on the root logger (pytest's own capture handlers are back afterwards)."""
    saved, root.handlers = root.handlers, []
    try:
        yield
    finally:
        root.handlers = saved + ours(root)


def record(level=logging.INFO, msg="step %d: loss %.2f", args=(100, 1.5), seconds=12.34):
    return logging.makeLogRecord({"name": "mebt.train.loop", "levelno": level, "levelname": logging.getLevelName(level),
                                  "msg": msg, "args": args, "relativeCreated": seconds * 1000})


def parse(line: str) -> tuple:
    """(rank, level, logger, message) of a formatted line."""
    return re.fullmatch(r"\[rank (\d+) \+\d+\.\ds (\w+)\] ([\w.]+): (.*)", line).groups()


def ours(root) -> list:
    return [h for h in root.handlers if isinstance(h, TqdmHandler)]


def test_format_has_rank_elapsed_seconds_level_and_logger():
    assert RankFormatter(3).format(record()) == "[rank 3 +12.3s INFO] mebt.train.loop: step 100: loss 1.50"
    try:
        raise ValueError("bad shard")
    except ValueError:
        failed = record(logging.ERROR, "gave up", (), 0.04)
        failed.exc_info = sys.exc_info()
    lines = RankFormatter(0).format(failed).splitlines()
    assert lines[0] == "[rank 0 +0.0s ERROR] mebt.train.loop: gave up" and lines[-1] == "ValueError: bad shard"


def test_ranks_above_0_pass_only_warnings_unless_debug():
    info, warning = record(), record(logging.WARNING)
    assert RankFilter(0).filter(info) and RankFilter(0).filter(warning)
    assert not RankFilter(1).filter(info) and RankFilter(1).filter(warning)
    assert RankFilter(5, everything=True).filter(info)


def test_setup_is_idempotent_and_sets_levels(bare_logging, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "2")
    setup_logging()
    setup_logging("info")
    assert len(ours(bare_logging)) == 1
    handler = ours(bare_logging)[0]
    assert handler.formatter.rank == 2 and not handler.filters[0].everything
    assert bare_logging.level == logging.WARNING and logging.getLogger("mebt").level == logging.INFO
    assert os.environ[LEVEL_ENV] == "INFO"   # what processes started from here read
    log.info("hidden on rank 2")
    log.warning("shown on rank 2")
    setup_logging("DEBUG", rank=1)   # the same handler, another rank and level
    assert ours(bare_logging) == [handler] and handler.formatter.rank == 1 and handler.filters[0].everything
    assert logging.getLogger("data_pipeline").level == logging.DEBUG and os.environ[LEVEL_ENV] == "DEBUG"
    log.debug("shown at DEBUG")
    logging.getLogger("urllib3").debug("other libraries stay at WARNING")
    out, err = capsys.readouterr()
    assert out == "" and [parse(line) for line in err.splitlines()] == [
        ("2", "WARNING", "mebt.train.loop", "shown on rank 2"), ("1", "DEBUG", "mebt.train.loop", "shown at DEBUG")]
    with pytest.raises(ConfigError, match="log level must be one of DEBUG, INFO"):
        setup_logging("verbose")


def test_ensure_sets_up_once_from_the_environment_and_leaves_other_handlers(bare_logging, monkeypatch):
    monkeypatch.setenv(LEVEL_ENV, "WARNING")
    with without_handlers(bare_logging):
        ensure_logging(rank=3)
        ensure_logging()
    handler, = ours(bare_logging)
    assert handler.formatter.rank == 3 and logging.getLogger("mebt").level == logging.WARNING
    ensure_logging(rank=0)   # the rank a training process learns late replaces the guessed one
    assert ours(bare_logging) == [handler] and handler.formatter.rank == 0
    assert logging.getLogger("mebt").level == logging.WARNING and not handler.filters[0].everything
    bare_logging.removeHandler(handler)
    ensure_logging(rank=1)   # an application (here pytest) that has handlers of its own keeps them alone
    assert ours(bare_logging) == []


def test_records_get_their_own_line_next_to_a_progress_bar(bare_logging, capsys):
    setup_logging()
    with tqdm(total=10, desc="train", file=sys.stderr, mininterval=0) as bar:
        bar.update(5)
        log.info("step 5")
        bar.update(5)
    err = capsys.readouterr().err
    line = next(line for line in err.split("\n") if "step 5" in line)
    # tqdm.write cleared the bar's line first: what shows after the last carriage return is the record alone.
    assert line.rsplit("\r", 1)[-1].startswith("[rank 0 +") and line.endswith("mebt.train.loop: step 5")


def test_warnings_are_one_record_that_never_glues_to_a_bar(bare_logging, capsys):
    setup_logging()
    with tqdm(total=10, desc="train", file=sys.stderr, mininterval=0) as bar:
        bar.update(5)
        warnings.warn("skipped corrupt shard 'x.tar'", UserWarning)   # raised from a test: another file
        bar.update(5)
    err = capsys.readouterr().err
    line = next(line for line in err.split("\n") if "corrupt shard" in line).rsplit("\r", 1)[-1]
    rank, level, logger, message = parse(line)
    assert (rank, level, logger) == ("0", "WARNING", "py.warnings")
    assert message == f"UserWarning: skipped corrupt shard 'x.tar' ({__file__}:{message.rsplit(':', 1)[1][:-1]})"


def test_mlflow_lines_go_through_the_handler_at_warning(bare_logging, capsys, tmp_path, monkeypatch):
    from mebt.train.tracking import mlflow_client

    monkeypatch.delenv("MLFLOW_LOGGING_LEVEL", raising=False)
    setup_logging()
    mlflow_client(f"sqlite:///{tmp_path / 'mlflow.db'}").search_experiments()   # creates the tables
    logging.getLogger("mlflow.store.db.utils").info("Creating initial MLflow database tables...")
    logging.getLogger("mlflow.store.db.utils").warning("a real problem")
    err = capsys.readouterr().err
    assert "Creating initial MLflow database tables" not in err
    assert [parse(line) for line in err.splitlines() if "a real problem" in line] == [
        ("0", "WARNING", "mlflow.store.db.utils", "a real problem")]


def test_training_processes_log_with_their_rank(codes_dir, tmp_path):
    # Started like SLURM tasks or launcher workers (rendezvous variables, no CLI): train() sets logging up
    # itself. Rank 0 logs at the default INFO; rank 1 was given DEBUG, so its INFO records show too.
    run = "from mebt.config import load_config; from mebt.train.config import RunConfig; " \
          "from mebt.train.loop import train; import sys; train(load_config(RunConfig, None, sys.argv[1:]))"
    args = overrides(codes_dir, tmp_path / "run", **{"train.steps": 2, "train.log_every": 1, "train.trace": "false"})
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != LEVEL_ENV}
    procs = [subprocess.Popen([sys.executable, "-c", run, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**env, "OMP_NUM_THREADS": "1", "RANK": str(r), "WORLD_SIZE": "2",
                                              "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                              **({LEVEL_ENV: "DEBUG"} if r else {})}) for r in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs[0][-3000:]
    records = [[line.rsplit("\r", 1)[-1] for line in err.splitlines() if "] mebt." in line] for err in errs]
    assert any(r.startswith("[rank 0 +") and " INFO] mebt.train.loop: MeBT " in r for r in records[0])
    assert any(r.startswith("[rank 0 +") and " INFO] mebt.train.loop: step 2/2: loss " in r for r in records[0])
    assert not any(" DEBUG] " in r for r in records[0])
    assert any(r.startswith("[rank 1 +") and " DEBUG] mebt.train.loop: rank 1 of 2 " in r for r in records[1])
    assert any(r.startswith("[rank 1 +") and " INFO] mebt.train.loop: step 2/2: loss " in r for r in records[1])
    assert all(r.startswith("[rank 1 +") for r in records[1])
    # Nothing from other libraries (DeepSpeed's accelerator line, torch's FutureWarning on a collective
    # DeepSpeed calls): every line is one of ours or a progress bar.
    for err in errs:
        shown = [part.strip() for part in err.replace("\n", "\r").split("\r") if part.strip()]
        assert [p for p in shown if not p.startswith(("[rank ", "train:", "samples at step"))] == []
