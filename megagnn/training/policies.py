"""The decisions a training loop acts on, as small pure functions of where the run stands:
when to log, validate and save, and why it stops. No state, no I/O: each is tested alone."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from megagnn.config import Config


class Stop(enum.Enum):
    """Why a run ended."""

    STEPS = "the planned number of steps is done"
    TIME = "the time budget is spent"
    SIGNAL = "a stop signal arrived"
    EARLY = "the validation loss stopped improving"


@dataclass(frozen=True)
class AfterStep:
    """What the loop does after optimizer step ``step`` (counted from 1)."""

    log: bool
    validate: bool
    final: bool


def after_step(cfg: Config, step: int, max_steps: int, time_up: bool) -> AfterStep:
    """Log every train.log_every steps, validate every validate.every steps; the last step
    of a run (planned, or the last the time budget allows) does both."""
    final = step >= max_steps or time_up
    every = cfg.validate.every
    return AfterStep(
        log=step % cfg.train.log_every == 0 or final,
        validate=bool(every) and (step % every == 0 or final),
        final=final,
    )


def save_now(
    cfg: Config, step: int, final: bool, improved: bool, early_stop: bool, since_save_s: float
) -> bool:
    """Save every checkpoint.every steps or checkpoint.every_s seconds, at the end, and when
    the validation loss improved (the best checkpoint) or early stopping ends the run."""
    every_s = cfg.checkpoint.every_s
    return (
        final
        or improved
        or early_stop
        or step % cfg.checkpoint.every == 0
        or (0 < every_s <= since_save_s)
    )


def stop_after_step(step: int, max_steps: int, time_up: bool, early_stop: bool) -> Stop | None:
    """The reason to end the run after this step, if any (signals end it before a step)."""
    if time_up:
        return Stop.TIME
    if early_stop:
        return Stop.EARLY
    if step >= max_steps:
        return Stop.STEPS
    return None
