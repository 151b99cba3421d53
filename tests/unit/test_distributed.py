"""Rendezvous settings from the environment each launcher leaves (torchrun/deepspeed, srun, none)."""
import sys

import pytest

from mebt.errors import UserError, say
from mebt.train.distributed import resolve_env, slurm_port


def test_launcher_variables_win():
    environ = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "node7", "MASTER_PORT": "29999",
               "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_ID": "0"}
    env = resolve_env(environ)
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.source) == \
        (3, 4, 1, "node7", 29999, "env")


def test_srun_task_variables_give_ranks_and_a_port_every_task_agrees_on():
    environ = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_STEP_ID": "0",
               "SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "n[1-2]", "MASTER_ADDR": "n1"}
    env = resolve_env(environ)
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.source) == (1, 2, 0, "n1", "slurm")
    assert env.master_port == slurm_port("1234") and environ["MASTER_PORT"] == str(env.master_port)
    assert (environ["RANK"], environ["WORLD_SIZE"], environ["LOCAL_RANK"]) == ("1", "2", "0")


def test_srun_without_scontrol_or_master_addr_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("PATH", "")   # no scontrol, as on a machine without SLURM's client commands
    environ = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "7",
               "SLURM_JOB_NODELIST": "n[1-2]"}
    with pytest.raises(UserError, match="cannot expand SLURM_JOB_NODELIST 'n\\[1-2\\]'.*set MASTER_ADDR"):
        resolve_env(environ)


def test_a_batch_script_without_a_step_is_one_process():
    # sbatch's own shell has SLURM_PROCID but no step: it is not one task of a parallel step.
    environ = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    env = resolve_env(environ)
    assert (env.rank, env.world_size, env.source, env.master_addr) == (0, 1, "single", "127.0.0.1")


def test_an_error_line_is_one_write_so_ranks_sharing_stderr_never_run_lines_together(monkeypatch):
    # print() writes the text and the newline separately: two ranks then printed "...pathmebt: error: ...".
    writes = []

    class Recorder:
        def write(self, text):
            writes.append(text)

        def flush(self):
            writes.append("<flush>")

    monkeypatch.setattr(sys, "stderr", Recorder())
    say("mebt: error: cannot write 'x'")
    assert writes == ["mebt: error: cannot write 'x'\n", "<flush>"]
