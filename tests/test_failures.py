"""Bad inputs and unlucky moments get one clear line, never a traceback or a silent NaN:
a second launch into a live run's folder, corrupt or truncated checkpoints read by every
tool, conversion into its own source, malformed YAML, a folder given as an input file."""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_training import tiny_config

from megagnn.checkpoint import CheckpointError, open_saved
from megagnn.config import ConfigError, load_config
from megagnn.evaluate import main as evaluate_main
from megagnn.inference import MegaGNNCalculator
from megagnn.pretrain import main as pretrain_main
from megagnn.training import lock
from megagnn.training.trainer import Trainer

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
from convert_checkpoint import main as convert_main  # noqa: E402

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def run(emt_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("failures") / "run"
    Trainer(tiny_config(emt_dataset, out, "train.max_steps=2")).train()
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns(lock.LOCK))
    return copy


def _one_line(call, *args) -> str:
    """Run a command-line main; it must fail with code 2 and one line on stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert call(list(args)) == 2
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1, err.getvalue()
    return lines[0]


def _hold_lock(folder: Path) -> subprocess.Popen:
    """Another live process holding ``folder``'s lock."""
    code = (
        "import sys, time; from megagnn.training import lock; "
        f"lock.acquire({str(folder)!r}); print('held', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_launch_into_a_live_runs_folder_is_refused(emt_dataset, tmp_path):
    holder = _hold_lock(tmp_path / "run")
    try:
        args = ["--set", f"data.path={emt_dataset}", f"train.out_dir={tmp_path / 'run'}"]
        line = _one_line(pretrain_main, *args, "train.max_steps=1", "train.progress=false")
        assert f"in use by a live run (pid {holder.pid} on " in line
    finally:
        holder.kill()
        holder.wait()
    # the holder died by SIGKILL: its lock is stale and the next run takes it over
    assert "took over the stale lock" in lock.acquire(tmp_path / "run")
    assert lock.acquire(tmp_path / "run") is None  # held by this process already
    lock.release(tmp_path / "run")
    assert not (tmp_path / "run" / lock.LOCK).exists()


def test_a_lock_of_a_reused_pid_is_stale(tmp_path):
    """A pid that now belongs to another process (started later) does not hold the lock."""
    me = lock._me()
    (tmp_path / lock.LOCK).write_text(json.dumps({**me, "pid": 1, "started": 0.0}))
    assert "took over" in lock.acquire(tmp_path)
    lock.release(tmp_path)


def _shard(checkpoint: Path) -> Path:
    return sorted(checkpoint.glob("*.distcp"))[0]


def test_truncated_shard_is_named_by_every_reader(run, tmp_path):
    copy = _copy(run, tmp_path)
    step = open_saved(copy).path
    shard = _shard(step)
    os.truncate(shard, shard.stat().st_size // 2)
    out = tmp_path / "consolidated"
    line = _one_line(convert_main, "consolidate", str(copy), str(out), "--no-progress")
    assert line.startswith(f"error: {shard}: truncated")
    assert not list(out.glob("*.tmp"))  # nothing half-written stays
    line = _one_line(convert_main, "package", str(copy), str(tmp_path / "m.pt2"))
    assert line.startswith(f"error: {shard}: truncated")
    assert _one_line(evaluate_main, "--run", str(copy)).startswith(f"error: {shard}: truncated")
    with pytest.raises(CheckpointError, match=f"{shard}: truncated"):  # an Exception
        MegaGNNCalculator(copy)
    assert issubclass(CheckpointError, Exception)


def test_corrupt_index_and_consolidated_weights_are_named(run, tmp_path):
    copy = _copy(run, tmp_path)
    index = open_saved(copy).path / ".metadata"
    index.write_bytes(b"\xf9" * 64)
    with pytest.raises(CheckpointError, match=f"{index}: corrupt"):
        open_saved(copy)
    consolidated = tmp_path / "consolidated"
    assert convert_main(["consolidate", str(run), str(consolidated), "--no-progress"]) == 0
    weights = consolidated / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 8)
    with pytest.raises(CheckpointError, match=f"{weights}: truncated"):
        MegaGNNCalculator(consolidated)


def test_conversion_into_its_own_source_is_refused(run, tmp_path):
    copy = _copy(run, tmp_path)
    before = sorted(p.name for p in copy.iterdir())
    step = open_saved(copy).path
    for out in (copy, step, step.parent, step / "x"):
        line = _one_line(convert_main, "consolidate", str(copy), str(out), "--no-progress")
        assert "which are being read; write to another folder" in line
    assert sorted(p.name for p in copy.iterdir()) == before
    assert convert_main(["consolidate", str(copy), str(copy / "c"), "--no-progress"]) == 0


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  hidden: 64\n  layers: [3\ntrain:\n  lr: 1\n")
    with pytest.raises(ConfigError, match=rf"^{path}:\d+: .*\(YAML\)$"):
        load_config(path)
    line = _one_line(pretrain_main, "--config", str(path))
    assert line.startswith(f"error: {path}:")


def test_a_folder_given_as_an_input_file_is_named_as_a_folder(tmp_path):
    from megagnn.data.preprocess import DataError, input_files

    with pytest.raises(DataError, match="is a folder; give the files in it"):
        input_files([str(tmp_path)])


def test_example_help_shows_defaults():
    text = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "md.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "(default: 200)" in text and "(default: 300.0)" in text


def test_stop_policies():
    from megagnn.training import policies

    cfg = load_config(None, ["train.log_every=5", "validate.every=4", "checkpoint.every=6"])
    plan = policies.after_step(cfg, 4, 100, time_up=False)
    assert (plan.log, plan.validate, plan.final) == (False, True, False)
    assert policies.after_step(cfg, 7, 7, time_up=False) == policies.AfterStep(True, True, True)
    assert policies.save_now(cfg, 6, False, False, False, 0.0)
    assert not policies.save_now(cfg, 5, False, False, False, 1e9)  # checkpoint.every_s=0
    assert policies.save_now(cfg, 5, False, True, False, 0.0)  # a new best
    assert policies.stop_after_step(3, 9, True, True) is policies.Stop.TIME
    assert policies.stop_after_step(3, 9, False, True) is policies.Stop.EARLY
    assert policies.stop_after_step(9, 9, False, False) is policies.Stop.STEPS
    assert policies.stop_after_step(3, 9, False, False) is None


def test_a_consolidation_that_fails_midway_leaves_no_file(tmp_path):
    import torch

    from megagnn.checkpoint.consolidated import write_weights

    def read(name):
        if name == "b":
            raise CheckpointError("b: unreadable")
        return torch.zeros(3)

    entries = [("a", (3,), torch.float32), ("b", (3,), torch.float32)]
    with pytest.raises(CheckpointError, match="b: unreadable"):
        write_weights(tmp_path / "model.safetensors", entries, read, {})
    assert list(tmp_path.iterdir()) == []
