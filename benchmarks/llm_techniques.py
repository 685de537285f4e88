#!/usr/bin/env python
"""Do LLM training techniques carry over to GNN potentials? One table, one data set:
bf16 autocast (accuracy and speed), activation recomputation (time overhead, activation
memory), ZeRO-1 (optimizer memory per rank), tensor and pipeline parallelism (throughput and
memory per rank) and μP (learning-rate transfer, from benchmarks/mup_transfer.py), each
against its baseline measured in the same run.

    python benchmarks/llm_techniques.py --data data/emt/processed --model mgnn-100k \\
        --profile-model mgnn-1m --atoms 500 --train-steps 300 \\
        --out benchmarks/results/llm-techniques-emt-cpu

Speed and memory come from tools/profile_throughput.py (the Trainer's own step on a fixed
periodic batch of --atoms atoms, one thread per rank); accuracy from two short pretraining
runs of --model on --data, fp32 and bf16, evaluated on the test split of the same
(group) split. On CPUs bf16 autocast has no fast matmuls, so its speed column says nothing
about GPUs; its accuracy column does.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from results_io import write_results  # benchmarks/, the scripts' own folder

ROOT = Path(__file__).resolve().parent.parent

# name -> (layouts, overrides) of each profile_throughput run
PROFILES = {
    "fp32": (["1x1", "2x1", "1x1x2"], []),
    "bf16": (["1x1"], ["train.precision=bf16"]),
    "recompute": (["1x1"], ["train.recompute_activations=true"]),
    "zero-off": (["1x1x2"], ["parallel.shard_optimizer=false"]),
    "direct": (["1x1", "1x2"], ["model.forces=direct", "model.stress=false"]),
}


def profile(args, overrides: list[str], layouts: list[str], tmp: Path) -> dict[str, dict]:
    out = tmp / f"profile-{len(list(tmp.iterdir()))}.json"
    cmd = [sys.executable, str(ROOT / "tools/profile_throughput.py"), "--model", args.profile_model]
    cmd += ["--atoms", str(args.atoms), "--steps", str(args.steps), "--layouts", *layouts]
    cmd += ["--out", str(out), "--set", f"model.cutoff={args.cutoff}", *overrides]
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    return {r["layout"]: r for r in json.loads(out.read_text())["summary"]}


def train(args, precision: str, tmp: Path) -> dict:
    run = tmp / f"run-{precision}"
    sets = [f"data.path={args.data}", f"train.out_dir={run}", f"train.precision={precision}"]
    sets += [f"train.max_steps={args.train_steps}", "train.progress=false", "validate.every=0"]
    sets += [f"model.cutoff={args.cutoff}", *args.set]
    model = ROOT / "configs" / "model" / f"{args.model}.yaml"
    cmd = [sys.executable, "-m", "megagnn.pretrain", "--config", str(args.config), "--set"]
    subprocess.run(
        [*cmd, *model_overrides(model), *sets], check=True, capture_output=True, cwd=ROOT
    )
    metrics = run / "test.json"
    cmd = [sys.executable, "-m", "megagnn.evaluate", "--run", str(run), "--json", str(metrics)]
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    return {**json.loads(metrics.read_text()), **json.loads((run / "compute.json").read_text())}


def model_overrides(path: Path) -> list[str]:
    """A model-size YAML as model.* overrides (so any base config can take it)."""
    import yaml

    values = yaml.safe_load(path.read_text()).get("model", {})
    return [f"model.{k}={json.dumps(v)}" for k, v in values.items()]


def mup_rows(path: str | None) -> list[tuple[str, str, str, str]]:
    """The best learning rate per width, μP against the standard parametrisation, from a
    benchmarks/mup_transfer.py result (its JSON)."""
    if not path:
        return [("μP learning-rate transfer", "not measured (--mup-result)", "", "")]
    best = json.loads(Path(path).read_text())["best"]
    widths = sorted({int(k.split("-")[1]) for k in best})
    small, large = widths[0], widths[-1]
    return [
        (
            f"μP: best lr at width {small} -> {large} ({Path(path).stem})",
            f"{best[f'mup-{small}']:g} -> {best[f'mup-{large}']:g}",
            f"{best[f'sp-{small}']:g} -> {best[f'sp-{large}']:g} (standard)",
            f"{best[f'mup-{large}'] / best[f'mup-{small}']:.2g}x vs "
            f"{best[f'sp-{large}'] / best[f'sp-{small}']:.2g}x",
        )
    ]


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True, help="preprocessed dataset for the accuracy runs")
    p.add_argument("--config", default=str(ROOT / "configs/quickstart.yaml"), help="base config")
    p.add_argument("--model", default="mgnn-100k", help="size trained for the accuracy rows")
    p.add_argument("--profile-model", default="mgnn-1m", help="size profiled for speed/memory")
    p.add_argument("--atoms", type=int, default=500, help="atoms in the profiled batch")
    p.add_argument("--steps", type=int, default=3, help="timed steps per profile")
    p.add_argument("--train-steps", type=int, default=300, help="steps of each accuracy run")
    p.add_argument("--cutoff", type=float, default=5.0, help="model cutoff (Å)")
    p.add_argument("--set", nargs="*", default=[], help="overrides for the accuracy runs")
    p.add_argument("--mup-result", help="a benchmarks/mup_transfer.py JSON for the μP row")
    p.add_argument("--out", help="write OUT.json and OUT.md")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prof = {}
        for name, (layouts, overrides) in PROFILES.items():
            prof[name] = profile(args, overrides, layouts, tmp)
            print(f"profiled {name}", flush=True)
        acc = {precision: train(args, precision, tmp) for precision in ("fp32", "bf16")}
        print("trained fp32 and bf16", flush=True)

    base = prof["fp32"]["1x1"]
    mb = 1e6
    rows = [
        (
            "bf16 autocast: test force MAE (eV/Å)",
            f"{acc['bf16']['forces_mae']:.4f}",
            f"{acc['fp32']['forces_mae']:.4f}",
            ratio(acc["bf16"]["forces_mae"], acc["fp32"]["forces_mae"]),
        ),
        (
            "bf16 autocast: test energy MAE (eV/atom)",
            f"{acc['bf16']['energy_per_atom_mae']:.4f}",
            f"{acc['fp32']['energy_per_atom_mae']:.4f}",
            ratio(acc["bf16"]["energy_per_atom_mae"], acc["fp32"]["energy_per_atom_mae"]),
        ),
        (
            "bf16 autocast: step time (s; CPU, no bf16 matmul units)",
            f"{prof['bf16']['1x1']['step_time_s']:.3f}",
            f"{base['step_time_s']:.3f}",
            ratio(prof["bf16"]["1x1"]["step_time_s"], base["step_time_s"]),
        ),
        (
            "activation recomputation: step time (s)",
            f"{prof['recompute']['1x1']['step_time_s']:.3f}",
            f"{base['step_time_s']:.3f}",
            ratio(prof["recompute"]["1x1"]["step_time_s"], base["step_time_s"]),
        ),
        (
            "activation recomputation: activations kept (MB)",
            f"{prof['recompute']['1x1']['max_activation_bytes_per_rank'] / mb:.1f}",
            f"{base['max_activation_bytes_per_rank'] / mb:.1f}",
            ratio(
                prof["recompute"]["1x1"]["max_activation_bytes_per_rank"],
                base["max_activation_bytes_per_rank"],
            ),
        ),
        (
            "ZeRO-1, DP=2: optimizer state per rank (MB)",
            f"{prof['fp32']['1x1x2']['max_optimizer_state_bytes_per_rank'] / mb:.2f}",
            f"{prof['zero-off']['1x1x2']['max_optimizer_state_bytes_per_rank'] / mb:.2f}",
            ratio(
                prof["fp32"]["1x1x2"]["max_optimizer_state_bytes_per_rank"],
                prof["zero-off"]["1x1x2"]["max_optimizer_state_bytes_per_rank"],
            ),
        ),
        (
            "ZeRO-1, DP=2: step time (s)",
            f"{prof['fp32']['1x1x2']['step_time_s']:.3f}",
            f"{prof['zero-off']['1x1x2']['step_time_s']:.3f}",
            ratio(prof["fp32"]["1x1x2"]["step_time_s"], prof["zero-off"]["1x1x2"]["step_time_s"]),
        ),
    ]
    for label, name, layout, ref in (
        ("TP=2 (conservative forces)", "fp32", "2x1", base),
        ("PP=2 (direct forces, 1 microbatch)", "direct", "1x2", prof["direct"]["1x1"]),
    ):
        r = prof[name][layout]
        rows += [
            (
                f"{label}: atoms/s on 2 ranks",
                f"{r['atoms_per_s']:.0f}",
                f"{ref['atoms_per_s']:.0f}",
                ratio(r["atoms_per_s"], ref["atoms_per_s"]),
            ),
            (
                f"{label}: parameters per rank (MB)",
                f"{r['max_parameter_bytes_per_rank'] / mb:.2f}",
                f"{ref['max_parameter_bytes_per_rank'] / mb:.2f}",
                ratio(r["max_parameter_bytes_per_rank"], ref["max_parameter_bytes_per_rank"]),
            ),
            (
                f"{label}: activations per rank (MB)",
                f"{r['max_activation_bytes_per_rank'] / mb:.1f}",
                f"{ref['max_activation_bytes_per_rank'] / mb:.1f}",
                ratio(r["max_activation_bytes_per_rank"], ref["max_activation_bytes_per_rank"]),
            ),
        ]
    rows += mup_rows(args.mup_result)
    lines = ["| technique: quantity | with | baseline | ratio |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    text = "\n".join(lines)
    print(text)
    if args.out:
        doc = {"profiles": prof, "accuracy": acc, "rows": rows}
        write_results(args.out, __file__, argv, "cpu, one thread per rank", doc, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
