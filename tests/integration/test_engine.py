"""`mebt train` with real DeepSpeed engines: 2 processes over gloo, exact resume after kill -9 and SIGTERM,
export, and one-line errors before anything is created."""
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import av
import pytest
import torch

from benchmarks.http_server import FolderServer
from mebt.cli import main
from mebt.core.model import MeBT
from mebt.core.model_file import load_model
from mebt.core.objective import ObjectiveConfig, masked_loss, sample_masks
from mebt.tokenizer.checkpoint import save_tokenizer
from mebt.tokenizer.vqgan import VQGAN, VQGANConfig
from mebt.train.distributed import free_port
from mebt.train.loop import REQUEUE_EXIT_CODE, MeBTLoss
from tests.helpers import CODES_GRID as GRID
from tests.helpers import tiny_config
from tests.helpers.engine import (
    command,
    latest,
    output_of,
    overrides,
    run,
    start_and_interrupt,
    steps_traced,
    trace,
    wait_for,
)


@pytest.fixture(scope="module")
def uninterrupted(codes_dir, tmp_path_factory):
    """Reference runs per ZeRO stage, 2 processes, never interrupted."""
    runs = {}
    for stage in (2, 3):
        run_dir = tmp_path_factory.mktemp(f"ref{stage}")
        done = run(2, overrides(codes_dir, run_dir, **{"deepspeed.zero_stage": stage}))
        assert done.returncode == 0, done.stderr[-3000:]
        runs[stage] = run_dir
    return runs


@pytest.mark.parametrize("stage", [2, 3])
def test_kill9_then_restart_repeats_the_uninterrupted_run(codes_dir, uninterrupted, tmp_path, stage):
    run_dir = tmp_path / "run"
    args = overrides(codes_dir, run_dir, **{"deepspeed.zero_stage": stage})
    proc = start_and_interrupt(2, args, run_dir, signal.SIGKILL)
    assert proc.returncode != 0
    killed_at = max(r["step"] for r in trace(run_dir, 0))
    stopped = int(latest(run_dir).removeprefix("global_step"))   # every process is gone: nothing moves on
    assert stopped <= killed_at < 60, "the run finished before it was killed; nothing was resumed"
    done = run(2, args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(rf"resumed at step {stopped}\b", done.stderr), done.stderr[-3000:]   # mid-run, its last checkpoint
    kept = sorted((run_dir / "checkpoints").glob("global_step*"), key=lambda p: int(p.name[len("global_step"):]))
    assert [p.name for p in kept] == ["global_step55", "global_step60"]   # train.keep_last: 2
    for rank in (0, 1):
        got, want = trace(run_dir, rank), trace(uninterrupted[stage], rank)
        # Every step once (the steps after the checkpoint were trimmed and redone), the same clips in the
        # same order, and bit-equal losses (deterministic mode).
        assert [r["step"] for r in got] == list(range(1, 61))
        assert [r["keys"] for r in got] == [r["keys"] for r in want]
        assert [r["loss"] for r in got] == [r["loss"] for r in want]


def test_training_from_shard_urls_killed_and_resumed_repeats_the_local_run(codes_dir, uninterrupted, tmp_path):
    """2 processes read the dataset from a loopback HTTP server by its WebDataset shard spec, are killed
    after a checkpoint and resumed: the same clips in the same order and bit-equal losses as the local run."""
    names = sorted(p.name for p in codes_dir.glob("train-*.tar"))
    with FolderServer(codes_dir) as server:
        url = f"{server.url}/train-{{{names[0][6:12]}..{names[-1][6:12]}}}.tar"
        run_dir = tmp_path / "run"
        args = overrides(codes_dir, run_dir, **{"deepspeed.zero_stage": 2, "data.data_dir": url,
                                               "data.max_shards_in_memory": 2})
        proc = start_and_interrupt(2, args, run_dir, signal.SIGKILL)
        assert proc.returncode != 0 and max(r["step"] for r in trace(run_dir, 0)) < 60
        done = run(2, args)
        assert done.returncode == 0, done.stderr[-3000:]
    assert any(p.endswith(".tar") for p in server.requests)
    for rank in (0, 1):
        got, want = trace(run_dir, rank), trace(uninterrupted[2], rank)
        assert [r["step"] for r in got] == list(range(1, 61))
        assert [r["keys"] for r in got] == [r["keys"] for r in want]
        assert [r["loss"] for r in got] == [r["loss"] for r in want]


def test_sigterm_checkpoints_exits_for_requeue_and_resumes(codes_dir, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    args = overrides(codes_dir, run_dir, **{"deepspeed.zero_stage": 2, "train.ckpt_every": 1000})
    # Two processes started the way srun starts tasks (rendezvous variables, no torchrun in between, so
    # their own exit codes are seen; one thread each, as torchrun sets, so the arithmetic matches the
    # reference run), and signalled the way SLURM signals them: every task. With
    # ckpt_every past the end, the only checkpoint before the end is the one SIGTERM asks for.
    port = free_port()
    procs = [subprocess.Popen(command(1, args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}) for r in range(2)]
    wait_for(lambda: steps_traced(run_dir) > 0, lambda: output_of(procs[0]), procs)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [REQUEUE_EXIT_CODE] * 2, outputs[0][-3000:]
    stopped = int(latest(run_dir).removeprefix("global_step"))
    assert 1 <= stopped < 60 and max(r["step"] for r in trace(run_dir, 0)) == stopped
    done = run(2, args)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        got, want = trace(run_dir, rank), trace(uninterrupted[2], rank)
        assert [r["keys"] for r in got] == [r["keys"] for r in want]
        assert [r["loss"] for r in got] == [r["loss"] for r in want]


def test_no_host_sync_per_micro_batch_and_the_metrics_of_before(codes_dir, tmp_path):
    # Each of 2 processes trains 3 and then 6 steps of 2 micro-batches, logging once at the end, with every
    # host read of a tensor in the step's code counted (tests/host_syncs.py): a read per micro-batch or per
    # step (loss.item(), int(hits), a blocking stop vote) makes the 6-step run read more than the 3-step one.
    args = overrides(codes_dir, tmp_path, **{"deepspeed.grad_accum": 2, "data.batch_size": 2, "train.ckpt_every": 1000})
    args = [a for a in args if not a.startswith(("train.steps=", "train.log_every=", "train.run_dir="))]
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "tests.host_syncs", str(tmp_path), *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(r), "WORLD_SIZE": "2",
                                   "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for r in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-3000:]
    runs = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    for rank_runs in runs:
        short, long = rank_runs["3"]["reads"], rank_runs["6"]["reads"]
        assert short == long and short, (short, long)   # the log step's reads are seen: the count works
    # Loss and accuracy as the loop computed them when it read every micro-batch: per rank, the sum over
    # steps of the micro-batches' mean, then the mean over steps and ranks, in the same order (bit-equal).
    windows = []
    for rank in (0, 1):
        records = trace(tmp_path / "steps6", rank)
        assert [r["step"] for r in records] == [s for s in range(1, 7) for _ in range(2)]
        loss = acc1 = 0.0
        for step in range(6):
            micro = records[2 * step:2 * step + 2]
            step_loss = sum(r["loss"] for r in micro) / 2
            for r in micro:
                acc1 += r["acc1"] / 2
            loss += step_loss
        windows.append((loss, acc1))
    logged = json.loads((tmp_path / "steps6" / "metrics.jsonl").read_text())
    assert logged["loss"] == (windows[0][0] + windows[1][0]) / 6 / 2
    assert logged["acc1"] == (windows[0][1] + windows[1][1]) / 6 / 2
    assert runs[0]["6"]["final_loss"] == logged["loss"]   # one final-loss definition: the last logged one


@pytest.mark.parametrize("stage", [2, 3])
def test_export_gives_a_model_that_loads_without_deepspeed(uninterrupted, tmp_path, stage):
    out = tmp_path / "model.pt"
    done = subprocess.run([sys.executable, "-m", "mebt.cli", "export", str(uninterrupted[stage]), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    model = load_model(out)
    assert model.cfg.latent_shape == GRID and all(p.dtype == torch.float32 for p in model.parameters())
    # The exported weights are the trained ones, not the initialisation: they differ from a fresh model's.
    torch.manual_seed(0)
    fresh = type(model)(model.cfg)
    assert not torch.equal(fresh.head.weight, model.head.weight)
    payload = torch.load(out, weights_only=True)
    assert payload["step"] == 60


def test_single_process_without_launcher_logs_metrics_and_samples(codes_dir, tmp_path):
    run_dir = tmp_path / "run"
    torch.manual_seed(0)
    tokenizer = tmp_path / "vqgan.ckpt"
    save_tokenizer(VQGAN(VQGANConfig(embedding_dim=8, n_codes=8, n_hiddens=4, downsample=(2, 4, 4), num_groups=4)),
                   tokenizer)
    done = run(1, overrides(codes_dir, run_dir, **{"train.steps": 10, "train.sample_every": 5,
                                                   "train.tokenizer": tokenizer}))
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10]
    for key in ("loss", "lr", "samples_per_s", "tokens_per_s", "step_time_s", "peak_memory_mib", "forward_s",
                "backward_s", "optimizer_s"):
        assert all(r[key] > 0 for r in records), key   # a broken timer or memory probe would give 0
    # The phases are parts of a step (the window's step time also holds the data wait and the logging).
    assert all(r["forward_s"] + r["backward_s"] + r["optimizer_s"] < r["step_time_s"] for r in records)
    assert "forward" in done.stderr and " / optimizer " in done.stderr
    assert all(0 <= r["acc1"] <= 1 and r["data_wait_s"] >= 0 for r in records)
    assert records[1]["tokens_per_s"] == pytest.approx(
        records[1]["samples_per_s"] * 32, rel=1e-6)
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == [
        f"step_{n:08d}.{ext}" for n in (5, 10) for ext in ("gif", "mp4", "npy")]
    with av.open(str(run_dir / "samples" / "step_00000010.mp4")) as video:
        frames = list(video.decode(video=0))
    # 2 code frames x 2 (the tokenizer's time factor) = 4 video frames of 16x16 tiles in a 2-sample grid.
    assert len(frames) == 4 and frames[0].width >= 2 * 16
    assert json.loads((run_dir / "deepspeed_config.json").read_text())["train_batch_size"] == 4
    # The phases after the last step have their own bars (kept), those at step 5 vanish once done.
    shown = [part.strip() for part in done.stderr.replace("\n", "\r").split("\r") if part.strip()]
    assert any(p.startswith("samples at step 10: 100%") and "4/4" in p for p in shown), shown[-20:]
    assert any(p.startswith("decoding samples: 100%") and "2/2" in p for p in shown), shown[-20:]
    assert any(p.startswith("samples at step 5:") for p in shown)
    assert json.loads(done.stdout.strip().splitlines()[-1])["final_loss"] == records[-1]["loss"]


def test_runs_under_the_deepspeed_launcher(codes_dir, tmp_path):
    run_dir = tmp_path / "run"
    launcher = Path(sys.executable).parent / "deepspeed"
    done = subprocess.run([str(launcher), "--num_gpus", "2", "--master_port", str(free_port()), "--module",
                           "mebt.cli", "train", *overrides(codes_dir, run_dir, **{"train.steps": 4})],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "2 process(es) (env)" in done.stderr
    assert [len(trace(run_dir, rank)) for rank in (0, 1)] == [4, 4]


def test_zero_stages_offload_and_activation_checkpointing_train_alike(codes_dir, tmp_path):
    # In fp32 every way of partitioning or offloading the same optimisation is the same arithmetic: the
    # per-step losses agree (to rounding), and a stage-0 checkpoint exports too.
    variants = {"zero0": {"deepspeed.zero_stage": 0},
                "zero0_accum": {"deepspeed.zero_stage": 0, "deepspeed.grad_accum": 2, "data.batch_size": 2},
                "zero1_accum": {"deepspeed.zero_stage": 1, "deepspeed.grad_accum": 2, "data.batch_size": 2},
                "zero3_offload": {"deepspeed.zero_stage": 3, "deepspeed.offload_optimizer": "true",
                                  "deepspeed.offload_param": "true"},
                "zero2_checkpointing": {"deepspeed.zero_stage": 2, "model.grad_checkpoint": "true"}}
    losses, params = {}, set()
    for name, extra in variants.items():
        done = run(1, overrides(codes_dir, tmp_path / name, **{"train.steps": 6, **extra}))
        assert done.returncode == 0, done.stderr[-3000:]
        losses[name] = [r["loss"] for r in trace(tmp_path / name, 0)]
        params |= set(re.findall(r"MeBT ([\d.]+)M params", done.stderr))
        setting = "on (set in the config)" if "checkpointing" in name else "off (set in the config)"
        assert f"activation checkpointing {setting}" in done.stderr
    assert len(params) == 1 and float(params.pop()) > 0   # not ZeRO-3's empty placeholders ("0.00M")
    # grad_accum 2 x batch 2 draws other masks, so its losses differ from the rest: 2 micro-batches per step,
    # the same under ZeRO 0 and 1.
    accum = losses.pop("zero1_accum")
    assert [r["step"] for r in trace(tmp_path / "zero1_accum", 0)] == [s for s in range(1, 7) for _ in range(2)]
    assert accum == pytest.approx(losses.pop("zero0_accum"), rel=1e-5) and len(accum) == 12
    for name, got in losses.items():
        assert got == pytest.approx(losses["zero0"], rel=1e-5), name
    assert main(["export", str(tmp_path / "zero0"), str(tmp_path / "zero0.pt")]) == 0
    assert load_model(tmp_path / "zero0.pt").cfg.latent_shape == GRID


def test_target_budget_loss_module_divides_by_the_masked_count():
    torch.manual_seed(0)
    model = MeBT(tiny_config(vocab_size=8, latent_shape=GRID))
    objective = ObjectiveConfig(t_range=(0.5, 0.5), target_budget=3, loss_chunk_rows=4)
    m = sample_masks(objective, 2, GRID, 0, torch.Generator().manual_seed(0))
    codes = torch.randint(0, 8, (2, 32))
    loss, _ = MeBTLoss(model, objective)(codes, m.ctx_idx, m.tgt_idx, m.n_masked)
    assert m.n_masked == 16 and m.tgt_idx.shape[1] == 3
    expected, _ = masked_loss(model(codes, m.ctx_idx, m.tgt_idx), codes, m.tgt_idx, n_masked=16)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_target_budget_training_loss_is_per_masked_position(codes_dir, tmp_path):
    # 2 targets of 16 masked positions: the official loss is about ln(8) * 2/16 near initialisation, where
    # a mean over the targets would be about ln(8). Run under ZeRO-3, which wraps the loss module's call.
    run_dir = tmp_path / "run"
    done = run(1, overrides(codes_dir, run_dir, **{"train.steps": 3, "deepspeed.zero_stage": 3,
                                                   "objective.target_budget": 2, "objective.t_range": "[0.5,0.5]"}))
    assert done.returncode == 0, done.stderr[-3000:]
    losses = [r["loss"] for r in trace(run_dir, 0)]
    assert len(losses) == 3 and all(0 < loss < math.log(8) / 4 for loss in losses), losses


def test_a_run_dir_in_use_is_refused_and_a_dead_holders_lock_is_taken_over(codes_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = overrides(codes_dir, run_dir, **{"train.steps": 100000, "train.ckpt_every": 3})
    first = subprocess.Popen(command(1, args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    wait_for(lambda: latest(run_dir) is not None, lambda: output_of(first), [first])
    try:
        for nproc in (1, 2):   # 2 processes: both stop with the line, neither waits for the other
            second = run(nproc, overrides(codes_dir, run_dir, **{"train.steps": 100000}), timeout=240)
            assert second.returncode != 0, second.stderr[-2000:]
            # Each rank of the 2-process start prints the line (their stderr may interleave).
            expected = re.escape(f"mebt: error: run dir '{run_dir}' is in use by another training (host "
                                 f"{socket.gethostname()}, pid {first.pid}, started ") + r"[0-9: -]+" + re.escape(
                                     "); stop it first, or train into another train.run_dir")
            assert re.search(expected, second.stderr), second.stderr[-2000:]
            assert nproc == 2 or "Traceback" not in second.stderr   # torchrun reports its failed children itself
        assert first.poll() is None   # untouched by the refused starts
    finally:
        os.killpg(first.pid, signal.SIGKILL)   # the holder dies without releasing: the kernel does
        first.wait(timeout=60)
    assert subprocess.run(["pgrep", "-s", str(first.pid)], capture_output=True).returncode == 1   # none left
    done = run(1, overrides(codes_dir, run_dir, **{"train.steps": int(latest(run_dir)[len("global_step"):]) + 2}))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed at step" in done.stderr


def test_resuming_with_a_changed_config_is_refused_by_key_or_recorded(codes_dir, tmp_path):
    run_dir, store = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = {"train.steps": 4, "train.ckpt_every": 2, "mlflow.enabled": "true", "mlflow.tracking_uri": store}
    assert run(1, overrides(codes_dir, run_dir, **base)).returncode == 0
    first_config = (run_dir / "config.yaml").read_text()
    refused = run(1, overrides(codes_dir, run_dir, **{**base, "train.steps": 6, "model.n_layer": 4, "optim.lr": 0.001}))
    assert refused.returncode == 2
    lines = [line for line in refused.stderr.splitlines() if line.startswith("mebt: error:")]
    assert lines == [f"mebt: error: resuming '{run_dir}' at step 4 with a changed config: model.n_layer (saved 2, "
                     "now 4), optim.lr (saved 0.003, now 0.001); these change the experiment: start a new "
                     "train.run_dir, or accept them with --allow-config-change KEY (recorded in the run)"], refused.stderr
    assert latest(run_dir) == "global_step4" and not (run_dir / "config_changes.jsonl").exists()
    accepted = run(1, [*overrides(codes_dir, run_dir, **{**base, "train.steps": 6, "optim.lr": 0.001}),
                       "--allow-config-change", "optim.lr"])
    assert accepted.returncode == 0, accepted.stderr[-3000:]
    assert latest(run_dir) == "global_step6" and (run_dir / "config.yaml").read_text() == first_config
    record = json.loads((run_dir / "config_changes.jsonl").read_text())
    assert record["step"] == 4 and [(c["key"], c["saved"], c["now"], c["how"]) for c in record["changes"]] == [
        ("allow_config_change", [], ["optim.lr"], "free"), ("optim.lr", 0.003, 0.001, "allowed"),
        ("train.steps", 4, 6, "free")]
    from mlflow.tracking import MlflowClient

    run_id = json.loads(accepted.stdout.strip().splitlines()[-1])["mlflow_run_id"]
    tag = MlflowClient(store).get_run(run_id).data.tags["config_changes"]
    assert "step 4: optim.lr 0.003 -> 0.001 (allowed)" in tag.splitlines()


def test_a_non_finite_loss_stops_before_its_weights_are_checkpointed(codes_dir, tmp_path):
    run_dir = tmp_path / "run"
    done = run(1, overrides(codes_dir, run_dir, **{"train.steps": 30, "train.ckpt_every": 1, "train.log_every": 10,
                                                   "optim.lr": 1e30, "train.deterministic": "false"}))
    assert done.returncode == 2, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("mebt: error:")]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    bad = int(lines[0].split("not finite since step ")[1].split()[0])
    steps = [int(p.name[len("global_step"):]) for p in (run_dir / "checkpoints").glob("global_step*")]
    assert 1 <= bad <= 30 and all(step < bad for step in steps)   # nothing from the bad step on was saved
    assert "lower optim.lr, set optim.grad_clip or check the data" in lines[0]
    losses = [r["loss"] for r in trace(run_dir, 0)]
    assert not math.isfinite(losses[bad - 1]) and all(math.isfinite(x) for x in losses[:bad - 1])


@pytest.mark.parametrize("extra, message", [
    ({"model.latent_shape": "[2,8,8]"}, "grid"),
    ({"model.vocab_size": 4}, "codebook"),
    ({"data.data_dir": "/nonexistent/codes"}, "does not exist"),
    ({"model.n_layr": 3}, "unknown config key 'model.n_layr'"),
    ({"train.global_batch_size": 6}, "not a multiple"),
    ({"deepspeed.zero_stage": 4}, "zero_stage"),
    ({"deepspeed.extra": "{gradient_clipping: 5.0}"}, "conflicts"),
])
def test_bad_input_is_one_line_before_anything_is_created(codes_dir, tmp_path, extra, message):
    run_dir = tmp_path / "run"
    done = run(1, overrides(codes_dir, run_dir, **extra), timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and lines[-1].startswith("mebt: error: ") and message in lines[-1], done.stderr[-2000:]
    assert "Traceback" not in done.stderr and not run_dir.exists()


def test_launch_local_runs_n_processes_and_passes_the_requeue_code_on(codes_dir, tmp_path):
    launch = [sys.executable, "-m", "mebt.cli", "launch", "local", "train", "--nproc", "2"]
    run_dir = tmp_path / "run"
    done = subprocess.run([*launch, *overrides(codes_dir, run_dir, **{"train.steps": 4})], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es) (env)" in done.stderr and [len(trace(run_dir, r)) for r in (0, 1)] == [4, 4]
    # A signal to the launcher reaches both processes; they checkpoint and the launcher exits with 75.
    stopped = tmp_path / "stopped"
    proc = subprocess.Popen([*launch, *overrides(codes_dir, stopped, **{"train.ckpt_every": 1000})],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: steps_traced(stopped) > 0, lambda: output_of(proc), [proc])
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == REQUEUE_EXIT_CODE, out[-3000:]
    assert latest(stopped) is not None


def test_ctrl_c_checkpoints_and_prints_one_line(codes_dir, tmp_path):
    """Ctrl-C in a terminal signals the launcher and its workers alike (one process group): the workers stop
    after a checkpoint at the next step boundary, and the one line says where it is and how to resume."""
    launch = [sys.executable, "-m", "mebt.cli", "launch", "local", "train", "--nproc", "2"]
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([*launch, *overrides(codes_dir, run_dir, **{"train.ckpt_every": 1000,
                                                                         "train.steps": 100000})],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(lambda: steps_traced(run_dir) > 0, lambda: output_of(proc), [proc])
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == REQUEUE_EXIT_CODE, err[-3000:]
    tag = latest(run_dir)
    lines = [line for line in err.splitlines() if line.startswith("mebt")]
    assert lines == [f"mebt: stopped by SIGINT at step {tag.split('global_step')[1]}; checkpoint saved in "
                     f"{run_dir / 'checkpoints' / tag}; run the same command to resume (exit code 75 asks a "
                     "launcher to requeue)"], err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    # The launcher and both workers are gone (workers run `-m mebt.train --config RUN_DIR/launch_config.yaml`).
    left = subprocess.run(["pgrep", "-f", str(run_dir / "launch_config.yaml")], capture_output=True, text=True)
    assert left.stdout.strip() == "", left.stdout


def test_a_broken_latest_checkpoint_names_the_file_and_the_previous_one_to_resume_from(uninterrupted, codes_dir,
                                                                                       tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted[2], run_dir)
    ckpt = run_dir / "checkpoints"
    args = overrides(codes_dir, run_dir, **{"deepspeed.zero_stage": 2, "train.steps": 62})
    model_states = ckpt / "global_step60" / "mp_rank_00_model_states.pt"
    model_states.write_bytes(model_states.read_bytes()[:1000])   # a checkpoint cut short by a full disk or a kill
    broken = [
        (lambda: None, f"'{model_states}' is truncated or damaged"),
        (lambda: (ckpt / "global_step60" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink(),
         "it has 1 optimizer state files for 2 processes (some were never written)"),
        (lambda: (ckpt / "latest").write_text("global_step65"), "it does not exist"),
    ]
    for damage, problem in broken:
        damage()
        done = run(2, args)
        lines = [line for line in done.stderr.splitlines() if line.startswith("mebt: error")]
        tag = (ckpt / "latest").read_text()
        assert done.returncode != 0 and len(lines) >= 1 and set(lines) == {
            f"mebt: error: cannot resume from '{ckpt / tag}': {problem}; resume from the previous complete one with "
            "--resume-from global_step55 (--resume-fallback does so automatically)"}, done.stderr[-3000:]
        assert not (ckpt / "global_step62").exists()
    # Asked to, it resumes from the previous one and redoes the same steps (bit-equal losses).
    done = run(2, [*args, "--resume-fallback"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from global_step55 (--resume-fallback)" in done.stderr
    assert re.search(r"resumed at step 55\b", done.stderr)
    for rank in (0, 1):
        got, want = trace(run_dir, rank), trace(uninterrupted[2], rank)
        assert [r["step"] for r in got] == list(range(1, 63))
        assert [r["loss"] for r in got][:60] == [r["loss"] for r in want]


class _Shell:
    """Unpickling this runs a shell command (what a crafted checkpoint file would do)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("stage", [2, 3])
def test_a_crafted_checkpoint_file_is_refused_without_running_it(uninterrupted, codes_dir, tmp_path, stage):
    # DeepSpeed's own loaders would unpickle it (torch.load(weights_only=False)): resume, export and the
    # universal conversion of another process count all read weights only.
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted[stage], run_dir)
    marker = tmp_path / "ran"
    tag = run_dir / "checkpoints" / "global_step60"
    name = "mp_rank_00_model_states.pt" if stage == 2 else "zero_pp_rank_0_mp_rank_00_model_states.pt"
    states = torch.load(tag / name, map_location="cpu", weights_only=False)   # our own file, from the fixture
    torch.save({**states, "note": _Shell(f"touch '{marker}'")}, tag / name)
    refusal = (f"checkpoint '{tag}' holds a file that is not a plain DeepSpeed checkpoint (it names posix.system "
               "that a checkpoint never holds); refused without running it")
    args = overrides(codes_dir, run_dir, **{"deepspeed.zero_stage": stage, "train.steps": 61})
    for nproc in (2, 1):   # the same process count, and another one (through the universal conversion)
        done = run(nproc, args)
        assert done.returncode != 0 and f"mebt: error: {refusal}" in done.stderr, done.stderr[-3000:]
        # No traceback from the workers (torchrun prints one of its own for any failed worker).
        frames = [line for line in done.stderr.splitlines() if 'File "' in line and "mebt" in line]
        assert not frames, done.stderr[-4000:]
    export = subprocess.run([sys.executable, "-m", "mebt.cli", "export", str(run_dir), str(tmp_path / "m.pt")],
                            capture_output=True, text=True, timeout=300)
    assert export.returncode == 2 and export.stderr.strip().splitlines()[-1].startswith(f"mebt: error: {refusal}")
    assert not marker.exists() and not (tmp_path / "m.pt").exists()


def test_a_full_disk_at_a_checkpoint_stops_in_one_line_and_keeps_the_last_one(codes_dir, tmp_path):
    # A real 800 KiB file system (tmpfs; the tests run as root): the checkpoint of step 5 (~470 KiB) fits,
    # the next one does not. Every rank learns it before any writes, so none waits for another.
    run_dir = tmp_path / "small"
    run_dir.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=800k", "tmpfs", str(run_dir)], check=True)
    try:
        done = run(2, overrides(codes_dir, run_dir, **{"deepspeed.zero_stage": 2, "train.steps": 20}))
        lines = {line for line in done.stderr.splitlines() if line.startswith("mebt: error")}
        assert done.returncode != 0 and len(lines) == 1, done.stderr[-3000:]
        assert re.fullmatch(rf"mebt: error: cannot write checkpoint global_step10: [\d.]+ MiB free on the file system "
                            rf"of '{run_dir / 'checkpoints'}' and a checkpoint takes about [\d.]+ MiB \(ENOSPC\); the "
                            r"last checkpoint \(global_step5\) and 'latest' are unchanged; free space or move "
                            r"train.run_dir, then run the same command to resume", lines.pop())
        assert latest(run_dir) == "global_step5" and not (run_dir / "checkpoints" / "global_step10").exists()
        assert not [line for line in done.stderr.splitlines() if 'File "' in line and "mebt" in line]
    finally:
        subprocess.run(["umount", "-l", str(run_dir)], check=True)


def test_a_read_only_run_dir_is_one_line_naming_the_path(codes_dir, tmp_path):
    mount = tmp_path / "ro"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    try:
        (mount / "run").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        done = run(2, overrides(codes_dir, mount / "run"))
        lines = {line for line in done.stderr.splitlines() if line.startswith("mebt: error")}
        assert done.returncode != 0 and lines == {
            f"mebt: error: cannot write '{mount / 'run' / '.lock'}': Read-only file system (EROFS); free space, fix "
            "the permissions or choose another path"}, done.stderr[-3000:]
        assert "terminate called" not in done.stderr, done.stderr[-3000:]   # the group is torn down, no abort
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)
