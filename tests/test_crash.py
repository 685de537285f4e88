"""Crash safety for real: training processes killed with SIGKILL during a step and during a
checkpoint save, and stopped by SIGTERM (preemption), then resumed. The resumed loss curve
must equal an uninterrupted run's, step for step."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_run import TINY_RUN

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
# a constant learning rate: the schedule does not depend on max_steps, so a run resumed with
# another max_steps follows the same curve as one that never stopped
SETTINGS = (*TINY_RUN, "optim.warmup_steps=0", "optim.min_lr_ratio=1.0")


def command(out, dataset, *overrides, nproc=1):
    args = ["--set", f"data.path={dataset}", f"train.out_dir={out}", *SETTINGS, *overrides]
    if nproc == 1:
        return [sys.executable, "-m", "megagnn.pretrain", *args]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*launch, f"--nproc_per_node={nproc}", "-m", "megagnn.pretrain", *args]


def run(out, dataset, *overrides, nproc=1):
    proc = subprocess.run(
        command(out, dataset, *overrides, nproc=nproc),
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def curve(out) -> dict[int, float]:
    """step -> training loss as metrics.jsonl has it (each step must appear once)."""
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss/total" in r]
    assert len(steps) == len(set(steps)), f"steps logged twice: {steps}"
    return {r["step"]: r["loss/total"] for r in rows if "loss/total" in r}


def logged_steps(out) -> int:
    path = Path(out) / "metrics.jsonl"
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    complete = [line for line in lines if line.endswith("}")]
    return json.loads(complete[-1])["step"] if complete else 0


def start_and_wait(cmd, out, min_step: int) -> subprocess.Popen:
    """Start a run in its own process group; return once it has logged ``min_step``."""
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        start_new_session=True,
    )
    deadline = time.time() + 180
    while logged_steps(out) < min_step:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the run never reached the step"
        time.sleep(0.02)
    return proc


def latest(out) -> int:
    return int((Path(out) / "checkpoints" / "latest").read_text().split("-")[1])


def test_sigkill_during_a_step_resumes_the_curve(emt_dataset, tmp_path):
    killed = tmp_path / "killed"
    proc = start_and_wait(
        command(killed, emt_dataset, "train.max_steps=1000", "checkpoint.every=3"), killed, 5
    )
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = latest(killed)
    assert saved >= 3 and saved % 3 == 0
    assert logged_steps(killed) >= saved  # steps after the checkpoint are lost, and redone
    end = logged_steps(killed) + 2
    out = run(killed, emt_dataset, f"train.max_steps={end}", "checkpoint.every=3")
    assert f"resumed from {killed / 'checkpoints' / f'step-{saved:08d}'}" in out
    reference = tmp_path / "reference"
    run(reference, emt_dataset, f"train.max_steps={end}", "checkpoint.every=1000")
    assert curve(killed) == curve(reference)  # bit for bit, fp64, one process


KILL_IN_SAVE = """
import os, signal, sys
from megagnn.checkpoint import sharded as checkpoint
real = checkpoint.dist_checkpointing

def dying():
    dc = real()
    class Dying:
        def __getattr__(self, name):
            return getattr(dc, name)
        def save(self, state, path):
            dc.save(state, path)  # the files are written ...
            if path.endswith("step-00000004.tmp"):  # ... but the save never completes:
                os.killpg(0, signal.SIGKILL)  # the node dies, helper processes included
    return Dying()

checkpoint.dist_checkpointing = dying
from megagnn.pretrain import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_during_a_checkpoint_save(emt_dataset, tmp_path):
    killed = tmp_path / "killed"
    args = ("train.max_steps=6", "checkpoint.every=2")
    cmd = command(killed, emt_dataset, *args)
    proc = subprocess.run(
        [sys.executable, "-c", KILL_IN_SAVE, *cmd[3:]],
        capture_output=True,
        text=True,
        env=ENV,
        start_new_session=True,  # its own process group, which it kills
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ckpts = killed / "checkpoints"
    assert latest(killed) == 2 and (ckpts / "step-00000004.tmp").is_dir()
    assert not (ckpts / "step-00000004").exists()
    out = run(killed, emt_dataset, *args)
    assert "resumed from" in out and "step-00000002" in out
    assert not (ckpts / "step-00000004.tmp").exists() and latest(killed) == 6
    reference = tmp_path / "reference"
    run(reference, emt_dataset, *args)
    assert curve(killed) == curve(reference)


@pytest.mark.parametrize("nproc", [2])
def test_sigterm_saves_and_exits_cleanly(emt_dataset, tmp_path, nproc):
    """Preemption under torchrun (two data-parallel ranks): torchrun forwards SIGTERM, every
    rank stops at the same step boundary, the checkpoint is saved there, the run resumes."""
    stopped = tmp_path / "stopped"
    args = ("train.max_steps=1000", "checkpoint.every=1000")
    proc = start_and_wait(command(stopped, emt_dataset, *args, nproc=nproc), stopped, 3)
    os.kill(proc.pid, signal.SIGTERM)  # the torchrun agent, as a scheduler would
    stdout, stderr = proc.communicate(timeout=120)
    assert "stopped by SIGTERM at step" in stdout, stdout[-2000:] + stderr[-3000:]
    assert "Traceback" not in stdout
    saved = latest(stopped)
    assert saved >= 3 and f"at step {saved};" in stdout
    end = saved + 2
    out = run(stopped, emt_dataset, f"train.max_steps={end}", "checkpoint.every=1000", nproc=nproc)
    assert "resumed from" in out
    reference = tmp_path / "reference"
    run(reference, emt_dataset, f"train.max_steps={end}", "checkpoint.every=1000", nproc=nproc)
    assert curve(stopped) == curve(reference)
