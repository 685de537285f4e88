"""When a run stops before its planned end: a stop signal (a scheduler preempting the job)
or the end of its wall-clock budget (train.time_budget). Every rank stops at the same step,
with a checkpoint, so rerunning the command resumes."""

from __future__ import annotations

import contextlib
import signal
import threading

import torch
import torch.distributed as dist


class StopSignals:
    """SIGTERM (torchrun forwards it to every worker) only sets a flag: the loop saves at the
    next step boundary and returns cleanly."""

    def __init__(self) -> None:
        self.received: int | None = None

    @contextlib.contextmanager
    def caught(self):
        self.received = None
        if threading.current_thread() is not threading.main_thread():
            yield  # Python delivers signals to the main thread only
            return

        def handler(signum, frame):
            self.received = signum

        previous = signal.signal(signal.SIGTERM, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)


class TimeBudget:
    """Whether the next step still fits in the budget, with the validation and checkpoint
    that end a run after it. Durations are the largest seen so far (a step's time varies
    with its batch), plus a margin of 2% of the budget."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.longest = {"step": 0.0, "validate": 0.0, "save": 0.0}

    def record(self, what: str, seconds: float) -> None:
        self.longest[what] = max(self.longest[what], seconds)

    def reserve(self) -> float:
        """Seconds kept back for the final validation and checkpoint."""
        ends = self.longest["validate"] + self.longest["save"]
        return self.longest["step"] + 1.5 * ends + 0.02 * self.seconds

    def progress(self, wall_s: float) -> float:
        """The share of the usable budget (all but the reserve) spent, in [0, 1]: what the
        learning-rate schedule reads, so it reaches its end where the run stops."""
        return min(max(wall_s / max(self.seconds - self.reserve(), 1e-9), 0.0), 1.0)

    def next_is_last(self, wall_s: float, validates: bool = False) -> bool:
        """True if after one more step (and its periodic validation, ``validates``) there
        is only just time left to validate and save."""
        step = self.longest["step"] + (self.longest["validate"] if validates else 0.0)
        return wall_s + step + self.reserve() >= self.seconds


def agree(flags: list[bool | int], device: torch.device, world_size: int) -> list[int]:
    """Each flag's maximum over all ranks (ranks see signals and clocks at different
    moments; all must decide alike)."""
    values = [int(f) for f in flags]
    if dist.is_initialized() and world_size > 1:
        box = torch.tensor(values, device=device)
        dist.all_reduce(box, op=dist.ReduceOp.MAX)
        values = box.tolist()
    return values
