"""Elastic resume: a checkpoint written by W processes resumes on W' != W (2 -> 1 and 1 -> 2, ZeRO 1/2/3),
with the clips per step, every step's clips and the losses of the uninterrupted run."""
import json
import shutil
from collections import defaultdict

import pytest

from tests.helpers.engine import overrides, run

# Measured on this CPU (fp32, deterministic kernels), max over steps 7-12 of |loss - uninterrupted loss|:
# 2 -> 1: 0 at ZeRO 1, 2 and 3; 1 -> 2: 1.8e-7 (ZeRO 1, 2), 1.2e-7 (ZeRO 3), float32 sums in another order.
TOLERANCE = 1e-6


def steps_of(run_dir, world: int) -> tuple[dict, dict]:
    """Per step: the mean loss over every rank's micro-batches (each one's mean over the same number of
    clips, so this is the global batch's loss) and the clip keys of the step, over all ranks."""
    losses, keys = defaultdict(list), defaultdict(list)
    for rank in range(world):
        path = run_dir / "trace" / f"rank{rank}.jsonl"
        for record in map(json.loads, path.read_text().splitlines() if path.exists() else []):
            losses[record["step"]].append(record["loss"])
            keys[record["step"]] += record["keys"]
    return {s: sum(v) / len(v) for s, v in losses.items()}, keys


def preempted_copy(reference, run_dir, step: int):
    """The run dir as a run preempted right after its checkpoint at ``step`` leaves it: that checkpoint is the
    latest, later ones do not exist, and the trace ends there (what a kill would leave is tested elsewhere)."""
    shutil.copytree(reference, run_dir)
    ckpt = run_dir / "checkpoints"
    for tag in ckpt.glob("global_step*"):
        if int(tag.name.removeprefix("global_step")) > step:
            shutil.rmtree(tag)
    (ckpt / "latest").write_text(f"global_step{step}")
    for path in (run_dir / "trace").glob("*.jsonl"):
        path.write_text("".join(line + "\n" for line in path.read_text().splitlines()
                                if json.loads(line)["step"] <= step))


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_elastic_resume_repeats_the_uninterrupted_run(codes_dir, tmp_path, stage, before, after):
    # 4 clips per step: 2 processes x 2 clips, or 1 process x 4 clips; after the change of process count
    # the same 4 clips are taken as 1 x 2 micro-batches x 2 clips, or 2 x 2 clips.
    args = {"deepspeed.zero_stage": stage, "data.batch_size": 4 // before, "train.steps": 12, "train.ckpt_every": 6,
            "train.log_every": 4, "train.keep_last": 3}
    reference = tmp_path / "reference"
    done = run(before, overrides(codes_dir, reference, **args))
    assert done.returncode == 0, done.stderr[-3000:]

    run_dir = tmp_path / "run"
    preempted_copy(reference, run_dir, 6)
    done = run(after, overrides(codes_dir, run_dir, **args))
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stdout + done.stderr
    layout = "1 x 2 micro-batch(es) x 2 clips" if after == 1 else "2 x 1 micro-batch(es) x 2 clips"
    assert f"resuming a {before}-process checkpoint on {after} process(es): 4 clips per step as {layout}" in log
    assert "resumed at step 6" in log and "MPU" not in log
    assert (run_dir / "checkpoints" / "universal" / "global_step6" / "zero").is_dir()

    want, want_keys = steps_of(reference, before)
    got, got_keys = steps_of(run_dir, max(before, after))
    assert sorted(got) == list(range(1, 13))
    for step in range(7, 13):
        assert sorted(got_keys[step]) == sorted(want_keys[step]), step   # the same clips in every step
        assert abs(got[step] - want[step]) <= TOLERANCE, (step, got[step], want[step])
    seen = [key for step in range(1, 13) for key in got_keys[step]]
    assert len(seen) == 48 and len(set(seen)) == 48   # 12 steps of an epoch of 300 clips: each clip once
    # The log window of step 8 began before the checkpoint at step 6: its sums were carried over, so the
    # logged averages are the uninterrupted run's too.
    want_log, got_log = ({r["step"]: r for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())}
                         for d in (reference, run_dir))
    assert sorted(got_log) == sorted(want_log) == [4, 8, 12]
    for step in (8, 12):
        for key in ("loss", "acc1"):
            assert abs(got_log[step][key] - want_log[step][key]) <= TOLERANCE, (step, key)

    # The checkpoint it writes records the run's own config; the next start on the first process count
    # follows the same slots again (nothing to convert, nothing refused).
    meta = json.loads((run_dir / "checkpoints" / "global_step12" / "mebt.json").read_text())
    assert (meta["world_size"], meta["global_batch"], meta["config"]["data"]["batch_size"]) == (after, 4, 4 // before)
    done = run(before, overrides(codes_dir, run_dir, **{**args, "train.steps": 15}))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed at step 12" in done.stdout + done.stderr
