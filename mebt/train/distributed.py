"""Process-group set-up that runs unchanged with no launcher, under torchrun, the deepspeed launcher or srun.

The rendezvous environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) is taken from, in order:

1. the variables themselves (torchrun and the deepspeed launcher set them);
2. SLURM task variables inside a job step (srun, submitit): ranks from SLURM_PROCID / SLURM_NTASKS /
   SLURM_LOCALID, the master is the first host of SLURM_JOB_NODELIST, and the port is derived from the
   job id so every task of a step computes the same one without talking;
3. nothing: one process, loopback, a free port.

DeepSpeed's ``init_distributed`` needs those variables (without them it goes looking for mpi4py), and on
CPU it compiles a shared-memory op with g++ on every cold start (40-60 s); gloo does not need that op,
so it is skipped.
"""
from __future__ import annotations

import importlib
import os
import socket
import subprocess
import warnings
from dataclasses import dataclass

import torch

from mebt.errors import UserError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str          # env | slurm | single


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_master(nodelist: str) -> str:
    """The first hostname of a SLURM node list (``n[1-2]`` -> ``n1``), expanded by scontrol as SLURM does."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError) as e:
        raise UserError(f"cannot expand SLURM_JOB_NODELIST '{nodelist}' with scontrol ({e}); set MASTER_ADDR") from None
    return out[0]


def slurm_port(job_id: str) -> int:
    # Tasks of one step agree on the port without communicating; distinct jobs sharing a node rarely collide.
    return 15000 + int(job_id) % 20000


def resolve_env(environ=os.environ) -> DistEnv:
    """Work out the rendezvous settings and write them into ``environ`` (what torch and DeepSpeed read)."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        env = DistEnv(int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_RANK", 0)),
                      environ.get("MASTER_ADDR", "127.0.0.1"), int(environ.get("MASTER_PORT", 29500)), "env")
    elif "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ and "SLURM_STEP_ID" in environ:
        job = environ.get("SLURM_JOB_ID", "0")
        env = DistEnv(int(environ["SLURM_PROCID"]), int(environ["SLURM_NTASKS"]), int(environ.get("SLURM_LOCALID", 0)),
                      environ.get("MASTER_ADDR") or slurm_master(environ["SLURM_JOB_NODELIST"]),
                      int(environ.get("MASTER_PORT") or slurm_port(job)), "slurm")
    else:
        env = DistEnv(0, 1, 0, "127.0.0.1", free_port(), "single")
    environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
                   MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))
    return env


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"config key 'train.device' is {name!r} but no CUDA device is available (use cpu or auto)")
        return torch.device("cuda", local_rank if name == "cuda" else int(name.split(":")[1]))
    return torch.device("cpu")


def quiet_deepspeed(device_type: str) -> None:
    """Before importing DeepSpeed: name the CPU accelerator ourselves on a CPU device (else DeepSpeed warns
    "Setting accelerator to CPU" at import), and silence the deprecation warning torch raises for a
    collective DeepSpeed's ZeRO calls (nothing a user can act on; every rank printed it at the first step)."""
    if device_type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*reduce_scatter_tensor.* is deprecated", category=FutureWarning)


def init_process_group(device: torch.device) -> None:
    """``deepspeed.init_distributed`` with nccl on GPUs and gloo on CPU, without the CPU op build."""
    quiet_deepspeed(device.type)
    import deepspeed  # imported here: it is slow to import and prints at import time
    from deepspeed import comm

    if device.type == "cpu":
        # gloo does its own shared memory; deepspeed.comm would otherwise g++-compile shm_comm on each start.
        # By module name: the attribute deepspeed.comm.torch is the torch package, not this module.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    else:
        torch.cuda.set_device(device)
    if not comm.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo" if device.type == "cpu" else "nccl", verbose=False)


def gpu_memory(device: torch.device) -> int | None:
    """The device's memory in bytes; None for a CPU (no fixed limit to plan against)."""
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def close_process_group() -> None:
    """Tear down a multi-process group before a process exits, on success or error: left to interpreter
    shutdown, gloo's threads sometimes abort the process ("terminate called without an active exception",
    SIGABRT) after it finished. A one-process group (in-process tests, one-process runs) is left for reuse."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from deepspeed import comm

        comm.destroy_process_group()


def all_gather_object(obj) -> list:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class StopVote:
    """Whether some rank asked to stop, agreed on without blocking a step.

    Each step boundary reads the MAX all-reduce of the flags started at the previous boundary and starts
    the next one, asynchronously, over gloo on a CPU tensor (its own group when training runs on nccl), so
    the vote never waits for the accelerator. The previous round has finished by the time it is read: every
    rank passed that boundary before the step's gradient reduction could complete. Every rank reads the
    same result at the same boundary, so they all stop there, one step after the first rank asked; with one
    process the flag counts at once.
    """

    def __init__(self):
        import torch.distributed as dist

        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.group = None
        if self.world > 1 and dist.get_backend() != "gloo":
            self.group = dist.new_group(backend="gloo")   # a collective call: every rank makes it here
        self.flag = torch.zeros(1, dtype=torch.int32)
        self.view = self.flag.numpy()   # the same memory: reading or setting it is no tensor operation
        self.pending = None

    def poll(self, flag: bool) -> bool:
        """True on every rank at the first boundary where the previous round saw some rank's flag."""
        import torch.distributed as dist

        if self.world == 1:
            return flag
        agreed = False
        if self.pending is not None:
            self.pending.wait()
            self.pending = None
            agreed = bool(self.view[0])
        if not agreed:   # after an agreed stop no rank starts another round
            self.view[0] = int(flag)
            self.pending = dist.all_reduce(self.flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        return agreed

    def close(self) -> None:
        """Finish the round in flight (every rank started it), so no collective outlives the loop."""
        if self.pending is not None:
            self.pending.wait()
            self.pending = None


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
