"""Where a training step's time goes: forward, backward (with the gradient reduction DeepSpeed overlaps
with it) and the optimizer step (with what is left of the reduction, and the weights' all-gather).

On a GPU the phases are timed with CUDA events recorded between them and read at log steps, when the loop
waits for the device anyway: timing adds no synchronization. On a CPU the wall clock is the device clock.
These are this process's times, averaged over the steps of a log window; they are not part of the restart
state (a resumed run's first window averages the steps since the start).
"""
from __future__ import annotations

import time

import torch

PHASES = ("forward", "backward", "optimizer")


class PhaseTimer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pending: list[list] = []   # per micro-batch: the marks before, between and after the phases
        self.steps = 0

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def add(self, marks: list) -> None:
        """The ``len(PHASES) + 1`` marks of one micro-batch."""
        self.pending.append(marks)

    def step(self) -> None:
        self.steps += 1

    def _seconds(self, start, end) -> float:
        return start.elapsed_time(end) / 1000 if self.cuda else end - start

    def collect(self) -> dict[str, float]:
        """Seconds per optimizer step in each phase since the last call (``{phase}_s``); empty without steps."""
        if not self.steps:
            return {}
        if self.cuda:
            self.pending[-1][-1].synchronize()
        totals = {phase: sum(self._seconds(m[i], m[i + 1]) for m in self.pending) / self.steps
                  for i, phase in enumerate(PHASES)}
        self.pending, self.steps = [], 0
        return {f"{phase}_s": seconds for phase, seconds in totals.items()}
