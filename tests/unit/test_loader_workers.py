"""DataLoader workers that live as long as the loader: the same batches as one process, across epochs,
moves (set_epoch, load_state_dict), elastic resume, and a clean stop."""
import gc
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_pipeline import shard_reader as reader_module
from data_pipeline.loader import CorruptShardError, make_loader
from tests.helpers.loader import (
    assert_same_batches,
    build_dataset,
    config,
    damage,
    global_steps,
    padded_dataset,
    sample_ids,
    take,
)


def worker_pids(before: set[int]) -> set[int]:
    """The child processes (DataLoader workers) alive now that were not in ``before``."""
    return {p.pid for p in multiprocessing.active_children()} - before


@pytest.mark.filterwarnings("ignore::data_pipeline.loader.CorruptShardWarning")
@pytest.mark.parametrize("damaged", [False, True])
def test_workers_live_across_epochs_and_yield_what_one_process_reads(tmp_path, damaged):
    # Rank 1 of 2 with 2 workers, 44 clips cropped, padded: 6 batches an epoch. The reference reads the same
    # plan in this process: a loader without workers resumed from the 2-worker state follows its slots.
    root, cfg = padded_dataset(tmp_path, damaged)
    in_process = make_loader(config(root, crop_frames=2, drop_last=False), 1, 2)
    in_process.load_state_dict(make_loader(cfg, 1, 2).state_dict())
    reference = take(in_process, 24)
    assert [b["epoch"] for b in reference] == [e for e in range(4) for _ in range(6)]
    before = worker_pids(set())
    loader = make_loader(cfg, 1, 2)
    got, pids = [], []
    for n in (4, 9):   # left early inside epoch 0, then on into epoch 2
        got += take(loader, n)
        pids.append(worker_pids(before))
    state = json.loads(json.dumps(loader.state_dict()))
    assert (state["epoch"], state["position"]) == (2, 1)   # what was taken, not what the workers made ahead
    got += take(loader, 11)
    assert_same_batches(got, reference)
    # Moved while its workers run: they restart at the new position.
    loader.set_epoch(1)
    assert_same_batches(take(loader, 3), reference[6:9])
    loader.load_state_dict(state)
    assert_same_batches(take(loader, 4), reference[13:17])
    pids.append(worker_pids(before))
    assert len(pids[0]) == 2 and all(p == pids[0] for p in pids)   # the same two processes in epochs 0 to 3
    older = iter(loader)
    next(older)
    next(iter(loader))
    with pytest.raises(RuntimeError, match="another iteration of this loader began"):
        next(older)
    resumed = make_loader(cfg, 1, 2)
    resumed.load_state_dict(state)
    assert_same_batches(take(resumed, 11), reference[13:])


def test_workers_reuse_checked_shard_layouts_in_later_epochs(tmp_path, monkeypatch):
    root = build_dataset(tmp_path / "ds", [8, 8, 8, 8])
    log, real = tmp_path / "checked.txt", reader_module._find_layout

    def logged(buf, members, shapes):   # runs in the workers (forked: Linux's default), which append to one file
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {members[0].decode()}\n")
        return real(buf, members, shapes)

    monkeypatch.setattr(reader_module, "_find_layout", logged)
    loader = make_loader(config(root, num_workers=2), 0, 1)
    for _ in range(3):
        assert sorted(i for b in loader for i in sample_ids(b)) == list(range(32))
    checked = log.read_text().splitlines()
    assert len({line.split()[0] for line in checked}) == 2     # the same two workers in every epoch
    assert len(checked) == len(set(checked)) <= 8               # each checks a shard once, not once an epoch


def test_elastic_loader_keeps_its_workers_across_epochs(tmp_path):
    # A running 2-worker loader (2 micro-batches of 2 a step) takes over the state of a 1-process loader
    # without workers (batches of 4): its workers follow the saved plan's steps through 3 epochs.
    root = build_dataset(tmp_path / "ds", [7, 13, 4, 16], frames=[4] * 40)
    saved = config(root, crop_frames=2)
    reference = global_steps([make_loader(saved, 0, 1)], 1, 30)
    before = worker_pids(set())
    loader = make_loader(config(root, crop_frames=2, batch_size=2, num_workers=2), 0, 1, accum=2)
    take(loader, 4)
    pids = worker_pids(before)
    loader.load_state_dict(make_loader(saved, 0, 1).state_dict())
    assert loader.elastic
    got = global_steps([loader], 2, 30)
    assert len(pids) == 2 and worker_pids(before) == pids
    assert [b["epoch"] for b in got] == [e for e in range(3) for _ in range(10)]
    for a, b in zip(got, reference):
        assert a["key"] == b["key"]
        for name in ("codes", "frame_offset", "pad", "sample_id"):
            assert torch.equal(a[name], b[name])


def test_workers_stop_with_the_loader_and_the_process_and_report_errors(tmp_path):
    root = build_dataset(tmp_path / "ds", [8, 8, 8, 8])
    before = worker_pids(set())
    loader = make_loader(config(root, num_workers=2), 0, 1)
    take(loader, 1)   # left inside the epoch: the workers hold batches made ahead
    assert len(worker_pids(before)) == 2
    loader.cycle = loader   # left to the cycle collector, as when an exception's traceback holds the loader
    del loader
    gc.collect()
    assert not worker_pids(before)   # stopped with the loader (before the fix: a 5 s join timeout per worker)
    script = ("import time; from data_pipeline.loader import LoaderConfig, make_loader; "
              f"loader = make_loader(LoaderConfig(data_dir={str(root)!r}, batch_size=4, num_workers=2)); "
              "next(iter(loader)); print('taken')")
    # A process that exits with its workers still running ends (a hang would hit the timeout).
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[2],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.split()[-1] == "taken", done.stderr
    damage(root / "train-000002.tar", "truncate")
    failing = make_loader(config(root, num_workers=2, on_corrupt="fail"), 0, 1)
    for _ in range(2):   # raised again by the restarted workers
        with pytest.raises(CorruptShardError, match="train-000002.tar' is corrupt"):
            list(failing)
