"""What a training restart needs besides the engine's own state (weights, optimizer, lr schedule), in one
object with torchtitan-style ``state_dict()`` / ``load_state_dict()``: ``TrainState``.

- ``step``, the MLflow ``run_id``, the loader position (one for every rank: they step together);
- this process's RNG streams (dropout; masks are drawn per clip from seeds, ``objective.slot_seeds``);
- the sums of the log window (``LogWindow``): a checkpoint between two log steps carries them, so the next
  logged average is the uninterrupted run's;
- the positions of the metric files: their records are keyed by step, and a restart keeps those up to
  ``step`` (``metrics.jsonl``, ``trace/rankN.jsonl``), so nothing is counted twice.

DeepSpeed writes its client state from one rank, so every rank's ``state_dict()`` is gathered into one
(``merge``) and each rank takes its own back (``for_rank``); after a change of process count the per-rank
parts that cannot be mapped (RNG streams) start afresh and the window's sums go to rank 0.
"""
from __future__ import annotations

import time

import torch


def rng_state() -> dict:
    """This process's global RNG streams (dropout)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class LogWindow:
    """Sums over the steps since the last log: loss and accuracy on the device (read at log and checkpoint
    steps only), FLOPs, tokens and data wait on the host (they come from shapes and clocks). ``steps`` counts
    the window's steps, restored ones included; ``timed`` those of this process, which the rates use."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.acc1 = torch.zeros((), dtype=torch.float64, device=device)
        self.flops = self.tokens = self.wait = 0.0
        self.steps = self.timed = 0
        self.start = time.perf_counter()

    def add_step(self, loss: torch.Tensor) -> None:
        self.loss += loss
        self.steps += 1
        self.timed += 1

    def state_dict(self) -> dict:
        return {"steps": self.steps, "loss": self.loss.item(), "acc1": self.acc1.item()}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]
        self.loss.fill_(state["loss"])
        self.acc1.fill_(state["acc1"])


class TrainState:
    """A rank's restart state; see the module docstring."""

    def __init__(self, loader, device: torch.device):
        self.step = 0
        self.mlflow_run_id: str | None = None
        self.loader = loader
        self.window = LogWindow(device)

    def new_window(self) -> None:
        self.window = LogWindow(self.window.loss.device)

    def state_dict(self) -> dict:
        return {"step": self.step, "mlflow_run_id": self.mlflow_run_id, "loader": self.loader.state_dict(),
                "rng": rng_state(), "window": self.window.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """``state``: what ``for_rank`` returns (``rng`` None: keep this process's fresh streams)."""
        self.step = state["step"]
        self.mlflow_run_id = state.get("mlflow_run_id") or self.mlflow_run_id
        self.loader.load_state_dict(state["loader"])
        if state.get("rng") is not None:
            set_rng_state(state["rng"])
        if state.get("window") is not None:
            self.window.load_state_dict(state["window"])


def merge(states: list[dict]) -> dict:
    """Every rank's ``state_dict()`` as one client state: shared values once, per-rank ones as lists."""
    first = states[0]
    return {"step": first["step"], "mlflow_run_id": first["mlflow_run_id"],
            "loader": [s["loader"] for s in states], "rng": [s["rng"] for s in states],
            "window": [s["window"] for s in states]}


def for_rank(client: dict, rank: int, world_size: int) -> dict:
    """Rank ``rank``'s state from a merged client state, on ``world_size`` processes (the same count as when it
    was saved or not). Checkpoints from before the window was saved have none (the window starts empty)."""
    saved_world = len(client["loader"])
    windows = client.get("window")
    if saved_world == world_size:
        return {**client, "loader": client["loader"][rank], "rng": client["rng"][rank],
                "window": windows[rank] if windows else None}
    window = None
    if windows:   # the logged mean is sum(ranks) / steps / processes: rank 0 carries the old ranks' share
        mean = {k: sum(w[k] for w in windows) / saved_world for k in ("loss", "acc1")}
        scale = world_size if rank == 0 else 0
        window = {"steps": windows[0]["steps"], "loss": mean["loss"] * scale, "acc1": mean["acc1"] * scale}
    return {**client, "loader": client["loader"][0], "rng": None, "window": window}
