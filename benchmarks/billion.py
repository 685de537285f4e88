#!/usr/bin/env python
"""A billion-parameter model through its whole life on one machine, with every process's
peak resident memory per stage:

1. train: configs/billion-cpu.yaml (schnet-1b, tensor parallel over 2 processes) for 6 steps,
   checkpointing at step 5;
2. crash: the same run again, SIGKILLed once its step-5 checkpoint is complete, then
   resumed to step 6: `resumed_exact` when its step-6 loss and its final weights equal the
   uninterrupted run's, bit for bit;
3. reshard: the crashed run's checkpoint to tensor=1 (one process, weights and moments);
4. consolidate: both runs' final checkpoints to safetensors (streamed: the peak above the
   process's baseline against the largest single tensor);
5. evaluate: the consolidated model through the ASE calculator on an EMT structure.

    python benchmarks/billion.py --out benchmarks/results/billion-cpu

Peaks are VmHWM of each process (/proc), polled every half second.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from results_io import write_results  # benchmarks/, the scripts' own folder

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def _hwm(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _label(pid: int) -> str:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = [e for e in env if e.startswith(b"RANK=")]
        if rank:
            return f"rank{rank[0].split(b'=')[1].decode()}"
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        return "launcher" if b"torch.distributed.run" in cmd else "main"
    except OSError:
        return "main"


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                kids = (task / "children").read_text().split()
                todo += [int(k) for k in kids]
        except OSError:
            continue
    return out


def stage(name: str, cmd: list[str], log: Path, kill_when=None, env=None) -> dict:
    """Run ``cmd`` (its own session), polling its processes' peaks; SIGKILL the session
    when ``kill_when()`` turns true. Returns peaks per process label, seconds, exit code."""
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    with open(log, "a") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})},
        )
        peaks: dict[int, tuple[str, int]] = {}
        killed = False
        while proc.poll() is None:
            for pid in _tree(proc.pid):
                hwm = _hwm(pid)
                if hwm is not None:
                    label = peaks.get(pid, (None, 0))[0] or _label(pid)
                    peaks[pid] = (label, max(hwm, peaks.get(pid, ("", 0))[1]))
            if kill_when is not None and not killed and kill_when():
                # every process of the job (torchrun's workers have sessions of their own)
                for pid in _tree(proc.pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                killed = True
            time.sleep(0.5)
    by_label: dict[str, int] = {}
    for label, peak in peaks.values():
        by_label[label] = max(by_label.get(label, 0), peak)
    row = {"stage": name, "seconds": time.perf_counter() - start, "returncode": proc.returncode}
    row.update(killed=killed, peak_rss_bytes=by_label)
    print(f"[{name}] {row}", flush=True)
    if proc.returncode != 0 and not killed:
        raise SystemExit(f"stage {name} failed (exit {proc.returncode}); see {log}")
    return row


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss/total"] for r in rows if "loss/total" in r}


def same_weights(a: Path, b: Path) -> tuple[bool, float]:
    """Whether two safetensors files hold the same tensors bit for bit (one at a time)."""
    import torch
    from safetensors import safe_open

    worst = 0.0
    with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb:
        if set(fa.keys()) != set(fb.keys()):
            return False, float("inf")
        for key in fa.keys():
            x, y = fa.get_tensor(key), fb.get_tensor(key)
            if not torch.equal(x, y):
                worst = max(worst, float((x - y).abs().max()))
    return worst == 0.0, worst


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/billion-cpu.yaml")
    p.add_argument("--model", default="schnet-1b", help="the size --config trains (for the table)")
    p.add_argument("--work", default="runs/billion", help="the stages' folders (large)")
    p.add_argument("--out", help="write OUT.json and OUT.md")
    p.add_argument("--set", nargs="*", default=[], help="overrides for the training runs")
    p.add_argument("--report", action="store_true", help="only report the stages done in --work")
    args = p.parse_args(argv)
    work = ROOT / args.work
    a, b = work / "a", work / "b"
    if args.report:
        return report(args, argv, work, a, b)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log = work / "stages.log"
    threads = {"OMP_NUM_THREADS": "1"}
    torchrun = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]

    def train(out: Path) -> list[str]:
        sets = [f"train.out_dir={out}", "train.threads=1", *args.set]
        return [*torchrun, "-m", "megagnn.pretrain", "--config", args.config, "--set", *sets]

    rows = Stages(work / "stages.jsonl")
    rows.append(stage("train", train(a), log, env=threads))

    from megagnn.checkpoint.sharded import latest_checkpoint

    def step5_saved() -> bool:
        found = latest_checkpoint(b / "checkpoints")
        return found is not None and found.name.endswith("5")

    rows.append(stage("train until SIGKILL", train(b), log, kill_when=step5_saved, env=threads))
    rows.append(stage("resume", train(b), log, env=threads))
    convert = [PY, "tools/convert_checkpoint.py"]
    rows.append(
        stage(
            "reshard to tensor=1",
            [*convert, "reshard", str(b), str(work / "tp1"), "--tensor", "1"],
            log,
        )
    )
    shutil.rmtree(work / "tp1", ignore_errors=True)  # 12 GB; its peak is what was asked
    for run in (a, b):
        out = Path(str(run) + "-consolidated")
        out.mkdir(exist_ok=True)
        memory = ["--memory-report", str(out / "memory.json"), "--no-progress"]
        cmd = [*convert, "consolidate", str(run), str(out), *memory]
        rows.append(stage(f"consolidate {run.name}", cmd, log))
    evaluate = [PY, "-c", EVALUATE, str(a) + "-consolidated"]
    rows.append(stage("evaluate (calculator)", evaluate, log, env=threads))
    return report(args, argv, work, a, b)


class Stages(list):
    """The stages' rows, each also appended to a JSON-lines file as it finishes."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def append(self, row: dict) -> None:
        super().append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def report(args, argv, work: Path, a: Path, b: Path) -> int:
    """The results of the finished stages in ``work``: losses, weights compared, peaks."""
    rows = [json.loads(x) for x in (work / "stages.jsonl").read_text().splitlines()]
    for row in rows:  # the consolidations' own accounts of their memory
        if row["stage"].startswith("consolidate "):
            folder = work / (row["stage"].split()[-1] + "-consolidated")
            row.update(json.loads((folder / "memory.json").read_text()))
    step_a, step_b = losses(a), losses(b)
    last = max(step_a)
    exact, worst = same_weights(
        Path(str(a) + "-consolidated") / "model.safetensors",
        Path(str(b) + "-consolidated") / "model.safetensors",
    )
    summary = _summary(args.model, a, rows, step_a, step_b, last, exact, worst)
    print(json.dumps(summary, indent=1))
    if args.out:
        device = "cpu, 2 processes of one thread"
        write_results(args.out, __file__, argv, device, summary, _table(summary))
    return 0


# evaluate a consolidated model through the ASE calculator (a separate process: its own peak)
EVALUATE = """
import sys, time, torch
from ase.build import bulk
from megagnn.inference.calculator import MegaGNNCalculator
atoms = bulk("Cu", "fcc", a=3.61, cubic=True) * (2, 2, 2)
atoms.numbers[::4] = 47
atoms.rattle(0.05, seed=0)
calc = MegaGNNCalculator(sys.argv[1], dtype=torch.float32, allow_unknown_elements=True)
atoms.calc = calc
start = time.perf_counter()
print("energy", atoms.get_potential_energy(), "max |F|", abs(atoms.get_forces()).max(),
      "seconds", time.perf_counter() - start)
"""


def _summary(model_name: str, run: Path, rows, step_a, step_b, last, exact, worst) -> dict:
    from megagnn.checkpoint.consolidated import open_weights

    with open_weights(str(run) + "-consolidated") as f:
        largest = max(_nbytes(f.get_slice(k)) for k in f.keys())
        parameters = sum(_numel(f.get_slice(k)) for k in f.keys())
    return {
        "rows": [
            {
                "model": model_name,
                "parameters": parameters,
                "layout": "tensor=2 (2 processes), fp32, activation recompute",
                "steps": last,
                "resumed_exact": bool(step_a[last] == step_b[last] and exact),
                "loss_uninterrupted": step_a[last],
                "loss_resumed": step_b[last],
                "weights_max_abs_difference": worst,
                "largest_tensor_bytes": largest,
                "consolidate_peak_over_largest_tensor": max(
                    r["peak_above_baseline_bytes"] / largest
                    for r in rows
                    if "baseline_rss_bytes" in r
                ),
                "peak_rss_bytes_per_rank": rows[0]["peak_rss_bytes"],
                "stages": rows,
            }
        ]
    }


def _numel(sl) -> int:
    n = 1
    for d in sl.get_shape():
        n *= d
    return n


def _nbytes(sl) -> int:
    return _numel(sl) * {"F32": 4, "F64": 8, "BF16": 2, "F16": 2}.get(sl.get_dtype(), 4)


def _table(summary: dict) -> str:
    row = summary["rows"][0]
    lines = [
        f"{row['model']}: {row['parameters']:,} parameters, {row['layout']}, {row['steps']} steps; "
        f"resumed exactly after SIGKILL: {row['resumed_exact']} (step-{row['steps']} loss "
        f"{row['loss_uninterrupted']:.6g} vs {row['loss_resumed']:.6g}; largest weight "
        f"difference {row['weights_max_abs_difference']}); largest tensor "
        f"{row['largest_tensor_bytes'] / 1e6:.1f} MB; consolidation's peak above its baseline: "
        f"{row['consolidate_peak_over_largest_tensor']:.2f}x the largest tensor",
        "",
        "| stage | seconds | peak RSS per process (GB) |",
        "|---|---:|---|",
    ]
    for s in row["stages"]:
        peaks = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in sorted(s["peak_rss_bytes"].items()))
        lines.append(f"| {s['stage']} | {s['seconds']:.0f} | {peaks} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
