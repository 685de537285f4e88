#!/usr/bin/env python
"""Scaling-law studies: a grid of model sizes x dataset fractions (x compute budgets), then
power-law fits and the compute-optimal frontier.

    python tools/scaling_laws.py sweep --config configs/scaling/emt-cpu.yaml \\
        --models model.hidden=8 model.hidden=16 mgnn-100k --fractions 0.25 0.5 1 \\
        --out runs/scaling
    python tools/scaling_laws.py fit runs/scaling --results benchmarks/results/scaling-emt

sweep: every (model, fraction) point is an ordinary pretraining run in OUT/<model>-f<fraction>
with data.train_fraction set, evaluated on the validation split when it ends (on its best
checkpoint when the base config early-stops with validate.patience). Train each point to its
own end: train.epochs (steps grow with the data) or validate.patience, never one step count
for all. --budgets C1 C2 ... adds a compute axis: each point trains for train.flops_budget=C
(OUT/<model>-f<fraction>-c<C>). A model is a
size name from configs/model/, a model YAML, or comma-separated overrides
(model.hidden=32,model.layers=3). --launch local runs the points one after another (an
interrupted point resumes from its checkpoint; finished points are skipped, so rerunning the
same command completes a sweep); --jobs J runs J points at once, each process with its share
of the cores (train.threads); --keep DIR copies each finished point's small records (config,
point, metrics, compute) to DIR, where a later sweep (on a machine without OUT) finds it
done, so a study longer than a sitting resumes from committed results. --launch print
writes OUT/commands.sh and --launch slurm writes OUT/sweep.sbatch (one array task per point)
for a cluster.

fit: reads each finished point (parameters counted from the model, training structures and
atoms from the data split, validation energy and force MAE) and fits, for each metric,
L(N) = E + A N^-alpha at the largest data fraction, L(D) = E + B D^-beta for the largest
model run at three or more data sizes (the reverse for L(N)), and L(N, D) = E + A N^-alpha
+ B D^-beta on all points, with bootstrap intervals.
With two or more budgets of three or more sizes each, it also fits the compute-optimal
frontier N_opt(C) ∝ C^a, D_opt(C) ∝ C^b (D: atoms processed) from the minima of the IsoFLOP
profiles. Every point reports its compute (FLOPs and wall time, from its compute.json).
Writes RESULTS.json, RESULTS.md (table of points and fits) and RESULTS-<metric>.png.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METRICS = {
    "energy": "energy_per_atom_mae",
    "energy_per_structure": "energy_mae",
    "forces": "forces_mae",
}
UNITS = {"energy": "eV/atom", "energy_per_structure": "eV", "forces": "eV/Å"}
# what --keep copies of a finished point (val_metrics.json last: it marks the point done)
KEPT = ("point.json", "config.yaml", "compute.json", "metrics.jsonl", "val_metrics.json")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sweep", help="run (or write out) the grid of pretraining runs")
    s.add_argument("--config", required=True, help="base pretraining config YAML")
    s.add_argument("--models", nargs="+", required=True, help="size names, YAMLs or overrides")
    s.add_argument("--fractions", nargs="+", type=float, default=[1.0], help="train fractions")
    s.add_argument("--budgets", nargs="+", type=float, default=[], help="compute budgets in FLOPs")
    s.add_argument("--out", required=True, help="sweep folder: one run folder per point")
    s.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="for every point")
    s.add_argument("--launch", choices=["local", "print", "slurm"], default="local")
    s.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun)")
    s.add_argument("--jobs", type=int, default=1, help="points run at once (--launch local)")
    s.add_argument("--keep", help="copy finished points' records here; points found here are done")
    f = sub.add_parser("fit", help="fit power laws to a finished sweep")
    f.add_argument("sweep", help="sweep folder")
    f.add_argument("--results", required=True, help="output path stem (.json, .md, .png)")
    f.add_argument("--bootstrap", type=int, default=300, help="bootstrap resamples")
    f.add_argument(
        "--repeats",
        nargs="*",
        default=[],
        metavar="FOLDER",
        help="finished points that repeat points of the sweep with another seed: they join "
        "the fits, and their spread sets the seed noise that each bootstrap resample adds",
    )
    return p.parse_args(argv)


# -- sweep ------------------------------------------------------------------------------------
def _flatten(values: dict, prefix: str = "") -> list[str]:
    """A nested dict as dotted overrides (values written as inline YAML)."""
    import yaml

    out = []
    for key, value in values.items():
        if isinstance(value, dict):
            out += _flatten(value, f"{prefix}{key}.")
        else:
            text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...")
            out.append(f"{prefix}{key}={text.strip()}")
    return out


def model_overrides(spec: str) -> tuple[str, list[str]]:
    """(point name, overrides) for a size name, a model YAML or comma-separated overrides."""
    if "=" in spec:
        overrides = [part for part in spec.split(",") if part]
        name = "-".join(o.split("=")[0].split(".")[-1] + o.split("=")[1] for o in overrides)
        return re.sub(r"[^A-Za-z0-9_.-]", "", name), overrides
    path = Path(spec)
    if not path.exists():
        path = ROOT / "configs" / "model" / f"{spec}.yaml"
    if not path.exists():
        sys.exit(f"--models {spec}: not a size name, a YAML file or KEY=VALUE overrides")
    import yaml

    values = yaml.safe_load(path.read_text()) or {}
    values.pop("include", None)
    return path.stem, _flatten(values)


def points(args: argparse.Namespace) -> list[dict]:
    out = []
    for spec in args.models:
        name, overrides = model_overrides(spec)
        for fraction in args.fractions:
            if not 0 < fraction <= 1:
                sys.exit(f"--fractions {fraction}: must lie in (0, 1]")
            for budget in args.budgets or [None]:
                run = Path(args.out) / f"{name}-f{fraction:g}"
                sets = [*args.set, *overrides, f"data.train_fraction={fraction}"]
                if budget is not None:
                    run = run.with_name(f"{run.name}-c{budget:.3g}")
                    # the budget sets the run's length: it replaces a base config's epochs
                    sets += ["train.epochs=null", f"train.flops_budget={budget:g}"]
                out.append(
                    {
                        "model": name,
                        "fraction": fraction,
                        "budget": budget,
                        "run": str(run),
                        "set": sets,
                    }
                )
    return out


def threads(args: argparse.Namespace) -> int:
    """Intra-op threads of each process when --jobs points of --nproc processes share the
    cores (two processes with default threads on two cores run 6x slower)."""
    return max(1, (os.cpu_count() or 1) // (max(1, args.jobs) * args.nproc))


def commands(point: dict, args: argparse.Namespace) -> list[list[str]]:
    """Train, then evaluate on the validation split (written last: it marks the point done)."""
    py = sys.executable
    launch = [py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    train = [*launch, "-m", "megagnn.pretrain", "--config", args.config, "--set"]
    train += [*point["set"], f"train.out_dir={point['run']}"]
    evaluate = [py, "-m", "megagnn.evaluate", "--run", point["run"], "--split", "val"]
    evaluate += ["--json", f"{point['run']}/val_metrics.json", "--no-progress"]
    given = [s.partition("=")[2] for s in point["set"] if s.startswith("train.threads=")]
    if given and given[-1] != "null":  # the points' own thread count serves evaluation too
        evaluate += ["--threads", given[-1]]
    elif args.jobs > 1:
        train += [f"train.threads={threads(args)}"]
        evaluate += ["--threads", str(threads(args))]
    # every point is measured on the same split: a structure holding an element that a
    # small data fraction never saw stays in (counted as unknown_element_structures)
    evaluate += ["--allow-unknown-elements"]
    return [train, evaluate]


def describe(point: dict, args: argparse.Namespace) -> dict:
    """Parameters counted from the model; training structures and atoms from the data split."""
    from megagnn.config import load_config
    from megagnn.models import build_model, count_parameters
    from megagnn.training.trainer import DataSplits

    cfg = load_config(args.config, [*point["set"], f"train.out_dir={point['run']}"])
    data = DataSplits(cfg)
    train = data.indices["train"]
    return {
        "model": point["model"],
        "fraction": point["fraction"],
        "budget": point.get("budget"),
        "parameters": count_parameters(build_model(cfg.model, device="meta")),
        "train_structures": len(train),
        "train_atoms": int(data.n_atoms[train].sum()),
        "max_steps": cfg.train.max_steps,
        "set": point["set"],
    }


def sweep(args: argparse.Namespace) -> int:
    todo = points(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.launch != "local":
        lines = [" && ".join(shlex.join(c) for c in commands(p, args)) for p in todo]
        if args.launch == "print":
            path = out / "commands.sh"
            path.write_text("#!/usr/bin/env bash\nset -e\n" + "\n".join(lines) + "\n")
        else:
            path = out / "sweep.sbatch"
            cases = "".join(f"  {i}) {line} ;;\n" for i, line in enumerate(lines))
            path.write_text(
                "#!/usr/bin/env bash\n"
                f"#SBATCH --array=0-{len(lines) - 1}\n"
                f"#SBATCH --ntasks-per-node=1\n#SBATCH --job-name=megagnn-scaling\n"
                f"set -e\ncd {shlex.quote(str(ROOT))}\n"
                f'case "$SLURM_ARRAY_TASK_ID" in\n{cases}esac\n'
            )
        print(f"wrote {path} ({len(lines)} points; finished points are skipped by `fit`)")
        return 0
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    keep = Path(args.keep) if args.keep else None
    done = [p for p in todo if finished(Path(p["run"]), keep)]
    bar = tqdm(total=len(todo), initial=len(done), desc="sweep", unit=" runs")
    failed = []

    def one(point: dict) -> None:
        if not run_point(point, args, keep):
            failed.append(point["run"])
        bar.update(1)

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        list(pool.map(one, [p for p in todo if p not in done]))
    bar.close()
    for run in failed:
        print(f"error: {Path(run).name} failed; see {Path(run) / 'sweep.log'}", file=sys.stderr)
    if failed:
        return 1
    where = keep or out
    print(f"{len(todo)} points in {where}; fit with: tools/scaling_laws.py fit {where} ...")
    return 0


def finished(run: Path, keep: Path | None) -> bool:
    return (run / "val_metrics.json").is_file() or (
        keep is not None and (keep / run.name / "val_metrics.json").is_file()
    )


def run_point(point: dict, args: argparse.Namespace, keep: Path | None) -> bool:
    """Train and evaluate one point (resuming its checkpoint); copy its records to ``keep``."""
    import shutil

    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if args.jobs > 1:
        env.update(OMP_NUM_THREADS=str(threads(args)), MKL_NUM_THREADS=str(threads(args)))
    run = Path(point["run"])
    run.mkdir(parents=True, exist_ok=True)
    (run / "point.json").write_text(json.dumps(describe(point, args), indent=1))
    for cmd in commands(point, args):
        with open(run / "sweep.log", "a") as log:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        if proc.returncode != 0:
            return False
    if keep is not None:
        (keep / run.name).mkdir(parents=True, exist_ok=True)
        for name in KEPT:
            if (run / name).is_file():
                shutil.copyfile(run / name, keep / run.name / name)
    return True


# -- fit --------------------------------------------------------------------------------------
def collect(folder: Path) -> list[dict]:
    rows = []
    for run in sorted(folder.iterdir()):
        info, metrics = run / "point.json", run / "val_metrics.json"
        if not (info.is_file() and metrics.is_file()):
            continue
        row = json.loads(info.read_text())
        row.update(json.loads(metrics.read_text()))
        if (run / "compute.json").is_file():  # what the point spent
            spent = json.loads((run / "compute.json").read_text())
            row.update(
                flops=spent["flops"],
                wall_s=spent["wall_s"],
                atoms_seen=spent["atoms"],
                steps=spent["steps"],
            )
        rows.append(row)
    return rows


def _fit_or_none(x, loss, d=None, bootstrap=300, noise=0.0):
    from megagnn.scaling import fit_power_law

    try:
        return fit_power_law(x, loss, d=d, bootstrap=bootstrap, noise=noise)
    except ValueError:
        return None


def _largest_with_range(values, other, points: int = 3) -> float:
    """The largest of ``values`` at which ``other`` takes ``points`` or more distinct values
    (the largest model run at several data sizes, and the reverse); else the largest."""
    for v in sorted(set(values.tolist()), reverse=True):
        if len(set(other[values == v].tolist())) >= points:
            return v
    return values.max()


def fits_for(rows: list[dict], key: str, bootstrap: int, noise: float = 0.0) -> dict:
    import numpy as np

    n = np.array([r["parameters"] for r in rows], float)
    d = np.array([r["train_structures"] for r in rows], float)
    loss = np.array([r[key] for r in rows], float)
    out = {}
    top_d, top_n = _largest_with_range(d, n), _largest_with_range(n, d)
    at_d, at_n = d == top_d, n == top_n
    kw = {"bootstrap": bootstrap, "noise": noise}
    out["L(N)"] = (_fit_or_none(n[at_d], loss[at_d], **kw), f"D = {top_d:.0f}")
    out["L(D)"] = (_fit_or_none(d[at_n], loss[at_n], **kw), f"N = {top_n:.0f}")
    out["L(N, D)"] = (_fit_or_none(n, loss, d=d, **kw), "all points")
    return out


def _fit_row(law: str, fit, where: str) -> str:
    if fit is None:
        return f"| {law} | {where} | too few points | | | |"
    p, ci = fit.params, fit.intervals

    def fmt(k):
        if k not in p:
            return ""
        lo, hi = ci.get(k, (float("nan"), float("nan")))
        return f"{p[k]:.3g} [{lo:.3g}, {hi:.3g}]"

    return (
        f"| {law} | {where} | {fmt('alpha')} | {fmt('beta')} | {fmt('E')} "
        f"| {fit.log_rmse:.3f} ({fit.points} points) |"
    )


def _implied_frontier(joint) -> list[str]:
    if joint is None or "a" not in joint.intervals:
        return []
    p, ci = joint.params, joint.intervals
    return [
        "",
        "Frontier implied by L(N, D) if compute grows as N D (a fixed number of passes over "
        f"the data): N_opt ∝ C^{p['a']:.3g} [{ci['a'][0]:.3g}, {ci['a'][1]:.3g}], "
        f"D_opt ∝ C^{p['b']:.3g} [{ci['b'][0]:.3g}, {ci['b'][1]:.3g}] (90% bootstrap)",
    ]


def plot(rows: list[dict], name: str, key: str, fits: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    joint = fits["L(N, D)"][0]
    fig, (ax_n, ax_d) = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, along, group, label in (
        (ax_n, "parameters", "train_structures", "D = {:.0f} structures"),
        (ax_d, "train_structures", "parameters", "N = {:.3g} parameters"),
    ):
        for value in sorted({r[group] for r in rows}):
            sel = sorted((r for r in rows if r[group] == value), key=lambda r: r[along])
            x = np.array([r[along] for r in sel], float)
            line = axis.loglog(x, [r[key] for r in sel], "o", label=label.format(value))[0]
            if joint is not None and len(x) > 1:
                grid = np.geomspace(x.min(), x.max(), 50)
                other = np.full_like(grid, value)
                n, d = (grid, other) if along == "parameters" else (other, grid)
                axis.loglog(grid, joint.predict(n, d), "-", color=line.get_color(), lw=1)
        axis.set_xlabel("parameters N" if along == "parameters" else "training structures D")
        axis.set_ylabel(f"validation {name} MAE ({UNITS[name]})")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    title = f"{name}: points and the joint fit L(N, D)"
    if joint is not None:
        title += f" (alpha={joint.params['alpha']:.2f}, beta={joint.params['beta']:.2f})"
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def frontier_lines(
    rows: list[dict], name: str, key: str, bootstrap: int, doc: dict, noise: float = 0.0
) -> list:
    """The compute-optimal frontier of the points trained to a budget, as markdown lines."""
    import numpy as np

    from megagnn.scaling import compute_optimal_frontier

    budgeted = [r for r in rows if r.get("budget") and "atoms_seen" in r]
    if len({r["budget"] for r in budgeted}) < 2:
        return []
    c, n, d, loss = (
        np.array([r[k] for r in budgeted], float)
        for k in ("budget", "parameters", "atoms_seen", key)
    )
    try:
        f = compute_optimal_frontier(c, n, d, loss, bootstrap=bootstrap, noise=noise)
    except ValueError as e:
        return ["", f"Compute-optimal frontier ({name}): not fitted: {e}"]
    doc.setdefault("frontier", {})[name] = f.__dict__
    ci = {k: f"[{lo:.3g}, {hi:.3g}]" for k, (lo, hi) in f.intervals.items()}
    return [
        "",
        f"Compute-optimal frontier of the validation {name} MAE (IsoFLOP minima; D = atoms "
        f"processed): N_opt ∝ C^{f.a:.3g} {ci.get('a', '')}, D_opt ∝ C^{f.b:.3g} "
        f"{ci.get('b', '')} (90% bootstrap)",
        "",
        "| budget C FLOPs | N_opt | D_opt atoms |",
        "|---|---|---|",
        *(
            f"| {b:.3g} | {no:.3g} | {do:.3g} |"
            for b, no, do in zip(f.budgets, f.n_opt, f.d_opt, strict=True)
        ),
    ]


def _point_key(row: dict) -> tuple:
    """What makes two records the same point: model size, data and budget (not the seed)."""
    return row["parameters"], row["train_structures"], row.get("budget") or 0


def seed_noise_lines(points: list[dict], part: str, name: str, key: str, doc: dict):
    """(noise, lines): the seed-to-seed spread of log loss over the ``points`` (sweep and
    repeats, of one ``part``: grid or budget) that share a point, and the line reporting it.
    The parts keep their own: short high-rate budget runs need not be as noisy as the grid."""
    from megagnn.scaling import seed_noise

    sigma, groups = seed_noise([_point_key(r) for r in points], [r[key] for r in points])
    if not groups:
        return 0.0, []
    doc.setdefault("seed_noise", {}).setdefault(name, {})[part] = {
        "sigma_log": sigma,
        "points": groups,
    }
    return sigma, [
        "",
        f"Seed noise of the validation {name} MAE, {part} points: {100 * sigma:.1f}% "
        f"(standard deviation of log MAE) over {groups} points trained with more than one "
        "seed; the bootstrap below draws fresh seeds' noise about the fitted curve.",
    ]


def fit(args: argparse.Namespace) -> int:
    for folder in [args.sweep, *args.repeats]:
        if not Path(folder).is_dir():
            print(f"error: {folder} is not a folder of finished points", file=sys.stderr)
            return 2
    rows = collect(Path(args.sweep))
    if not rows:
        print(f"error: no finished points in {args.sweep}", file=sys.stderr)
        return 2
    repeats = [r for folder in args.repeats for r in collect(Path(folder))]
    every = rows + repeats
    for r in every:
        r.setdefault("flops", float("nan"))
    # the laws in N and D from the grid; points trained to a budget make the frontier.
    # A sweep holds each point once, so the points seen twice are the repeats.
    grid = [r for r in every if not r.get("budget")] or every
    budgeted = [r for r in every if r.get("budget")]
    stem = Path(args.results)
    stem.parent.mkdir(parents=True, exist_ok=True)
    doc = {"sweep": args.sweep, "points": rows, "repeats": repeats, "fits": {}}
    lines = [
        "| model | parameters N | fraction | structures D | atoms | steps | compute C FLOPs "
        "| wall s | energy MAE eV/atom | energy MAE eV | force MAE eV/Å |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    nan = float("nan")
    marked = [dict(r, model=f"{r['model']} (repeat)") for r in repeats]
    for r in sorted(rows + marked, key=lambda r: (_point_key(r), r["model"])):
        lines.append(
            f"| {r['model']} | {r['parameters']} | {r['fraction']:g} | {r['train_structures']} "
            f"| {r['train_atoms']} | {r.get('steps', '')} | {r['flops']:.3g} "
            f"| {r.get('wall_s', nan):.0f} | {r.get(METRICS['energy'], nan):.5f} "
            f"| {r.get(METRICS['energy_per_structure'], nan):.5f} "
            f"| {r.get(METRICS['forces'], nan):.5f} |"
        )
    for name, key in METRICS.items():
        if not all(key in r for r in every):
            continue
        noise, noise_lines = seed_noise_lines(grid, "grid", name, key, doc)
        budget_noise, budget_lines = seed_noise_lines(budgeted, "budget", name, key, doc)
        lines += noise_lines + budget_lines
        fits = fits_for(grid, key, args.bootstrap, noise)
        doc["fits"][name] = {
            law: None
            if f is None
            else {
                "where": where,
                "params": f.params,
                "intervals": f.intervals,
                "log_rmse": f.log_rmse,
                "points": f.points,
            }
            for law, (f, where) in fits.items()
        }
        lines += [
            "",
            f"Fits of the validation {name} MAE ({UNITS[name]}), 90% bootstrap intervals:",
            "",
            "| law | on | alpha | beta | E (irreducible) | log-RMS error |",
            "|---|---|---|---|---|---|",
            *(_fit_row(law, f, where) for law, (f, where) in fits.items()),
            *_implied_frontier(fits["L(N, D)"][0]),
        ]
        plot(rows, name, key, fits, stem.parent / f"{stem.name}-{name}.png")
        lines += frontier_lines(every, name, key, args.bootstrap, doc, budget_noise)
    text = "\n".join(lines)
    print(text)
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    stem.with_suffix(".md").write_text(text + "\n")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return sweep(args) if args.command == "sweep" else fit(args)


if __name__ == "__main__":
    sys.exit(main())
