"""One live run per ``out_dir``: the main rank holds ``out_dir/LOCK`` (host, pid, process
start time) while it trains. A second launch into the folder is refused, naming the holder;
a lock whose process is gone (killed with SIGKILL, a crashed node rebooted) is taken over
with a message."""

from __future__ import annotations

import atexit
import json
import os
import socket
import time
from pathlib import Path

import psutil

from megagnn.config import ConfigError

LOCK = "LOCK"


class RunLocked(ConfigError):
    """Another live process trains in this out_dir."""


def _me() -> dict:
    process = psutil.Process()
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": process.create_time()}


def _alive(holder: dict) -> bool | None:
    """Whether the holder still runs: None when that cannot be known (another host)."""
    if holder.get("host") != socket.gethostname():
        return None
    try:
        started = psutil.Process(int(holder["pid"])).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError, ValueError, TypeError):
        return False
    return abs(started - float(holder.get("started", -1))) < 1.0  # not a reused pid


def _describe(holder: dict) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {when}"


def acquire(out_dir: str | Path) -> str | None:
    """Take ``out_dir``'s lock for this process until it exits (or ``release``). Returns a
    message when a stale lock was taken over; raises RunLocked when a live run holds it."""
    path = Path(out_dir) / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    me, note = _me(), None
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
            except (OSError, ValueError):
                holder = {}  # half-written by a process that died at once
            if holder and holder.get("pid") == me["pid"] and holder.get("host") == me["host"]:
                return None  # this process holds it already (a second Trainer)
            alive = _alive(holder) if holder else False
            if alive is None:
                raise RunLocked(
                    f"{path} is held by {_describe(holder)}, another machine: a run may be "
                    f"training into {out_dir}. Use another train.out_dir, or delete {path} "
                    "once that run is gone"
                ) from None
            if alive:
                raise RunLocked(
                    f"{out_dir} is in use by a live run ({_describe(holder)}); stop it or use "
                    "another train.out_dir"
                ) from None
            note = f"took over the stale lock of a run that is gone ({_describe(holder)})"
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        atexit.register(release, path)
        return note
    raise RunLocked(f"{path}: could not take the lock (another launch races for it)")


def release(path: str | Path) -> None:
    """Remove the lock if this process holds it."""
    path = Path(path)
    if path.is_dir():
        path = path / LOCK
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)
