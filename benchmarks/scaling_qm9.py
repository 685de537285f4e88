#!/usr/bin/env python
"""The QM9 U0 scaling grid: per family, model widths x nested training subsets of 1k to 110k
molecules, energy only, under μP (configs/scaling/qm9-cpu.yaml), each point an ordinary run
of `tools/scaling_laws.py sweep` whose finished records land in
benchmarks/results/scaling-qm9-rows/<family>/ (so the study resumes from committed results).

    python benchmarks/scaling_qm9.py --families painn egnn irrep --jobs 2
    python benchmarks/scaling_qm9.py --families painn --fit   # the fits of what has landed
    python benchmarks/scaling_qm9.py --report   # every family's exponents, published beside

Protocol: a point with D training molecules trains for E(D) = E_max_d (D_max / D)^gamma
epochs (default 3 epochs at 110k, 31 at 1k: gamma = 0.5) on a cosine schedule and is
evaluated on the whole validation split at its end. `--check` adds the points that say
whether a point is converged (twice the epochs, and a second seed). None checked is: PaiNN
width 32 gains 10.5%, 12.8% and 25.7% from twice the epochs at 968, 2,961 and 9,967
molecules, so the grid measures the error at this schedule, and its beta is low. The
compute axis (`--budgets 1e12 3e12 1e13`) trains every width on the full training split for
a fixed number of FLOPs each: the IsoFLOP profiles whose minima make the compute-optimal
frontier. Their records land beside the grid's (the fit tells them apart by their budget).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from scaling_laws import collect  # noqa: E402  (the sweep's own reader of finished points)

SIZES = [1000, 3000, 10000, 30000, 110000]  # training molecules (nested subsets)
D_MAX = 110000
# widths per family: at least 1.5 decades of parameters each (H..F embedding, 3 blocks):
# PaiNN 15.5k-593k, EGNN 24k-1.25M, IrrepNet (lmax 2, correlation 2) 17k-623k, SchNet
# 15k-654k
WIDTHS = {
    "painn": [16, 32, 64, 128],
    "egnn": [32, 64, 128, 256],
    "irrep": [8, 24, 64, 128],
    "schnet": [32, 64, 128, 256],
}
FAMILY_SETS = {"irrep": ["model.lmax=2", "model.correlation=2"]}
# points trained again with seed 1 (the grid's convergence checks, and IsoFLOP points): the
# fits take them in, and their spread is the seed noise of the fits' bootstrap
REPEATS = ["{rows}/{family}-seed1", "benchmarks/results/scaling-qm9-rows-isoflop-seed1/{family}"]


def epochs(size: int, top: float, gamma: float) -> float:
    return round(top * (D_MAX / size) ** gamma, 1)


def sweep(family: str, size: int, args, extra: list[str], tag: str = "") -> int:
    fraction = size / D_MAX
    e = epochs(size, args.epochs, args.gamma) * (2 if "long" in tag else 1)
    steps = e * size / 28  # about 28 molecules per 512-atom batch
    sets = [
        f"train.epochs={e}",
        f"validate.every={max(50, int(steps / 8))}",
        "train.compile=true",
        *FAMILY_SETS.get(family, []),
        *extra,
        *args.set,
    ]
    models = [f"model.family={family},model.hidden={w}" for w in args.widths or WIDTHS[family]]
    name = f"{family}{tag}"
    cmd = [sys.executable, "tools/scaling_laws.py", "sweep", "--config", args.config]
    cmd += ["--models", *models, "--fractions", f"{fraction:.6g}", "--jobs", str(args.jobs)]
    cmd += ["--out", f"{args.work}/{name}", "--keep", f"{args.rows}/{name}", "--set", *sets]
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=ROOT)


def isoflop(family: str, budget: float, args) -> int:
    """The IsoFLOP profile of one budget: each width trains on the full training split for
    ``budget`` FLOPs (forward and backward, counted per atom), the schedule spanning it."""
    sets = ["validate.every=250", "train.compile=true", *FAMILY_SETS.get(family, [])]
    widths = args.widths or WIDTHS[family]
    models = [f"model.family={family},model.hidden={w}" for w in widths]
    name = f"{family}-isoflop"
    cmd = [sys.executable, "tools/scaling_laws.py", "sweep", "--config", args.config]
    cmd += ["--models", *models, "--fractions", "1", "--budgets", f"{budget:g}"]
    cmd += ["--jobs", str(args.jobs), "--out", f"{args.work}/{name}"]
    cmd += ["--keep", f"{args.rows}/{family}", "--set", *sets, *args.set]
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=ROOT)


# published exponents beside which the QM9 ones are read (alpha, beta, N_opt exponent a)
PUBLISHED = [
    (
        "EGNN",
        "OMol25 subset, 34M structures, 1 epoch, μP (Ngo & Ravanbakhsh 2025)",
        0.39,
        0.39,
        0.5,
    ),
    ("GemNet-OC", "same", 0.52, 0.50, 0.5),
    ("eSEN (l ≤ 4)", "same", 0.82, 0.75, 0.5),
    ("UMA (dense)", "OMat/OMol/OC/ODAC mixture (UMA paper, 2025)", None, None, 0.61),
    ("equivariant GNN", "Frey et al. 2023", None, 0.26, None),
]


def _interval(value: float, intervals: dict, key: str) -> str:
    lo, hi = intervals.get(key, (float("nan"), float("nan")))
    return f"{value:.2f} [{lo:.2f}, {hi:.2f}]"


def _fit_interval(fit: dict | None, key: str) -> str:
    if not fit or key not in fit["params"]:
        return ""
    return _interval(fit["params"][key], fit["intervals"], key)


def _mae_by_point(folder: Path) -> dict[tuple[int, int], float]:
    """(parameters, training molecules) -> validation MAE in meV, of the kept records."""
    rows = collect(folder) if folder.is_dir() else []
    return {(r["parameters"], r["train_structures"]): 1000 * r["energy_mae"] for r in rows}


def convergence_lines(args) -> list[str]:
    """The points trained again with a second seed and with twice the epochs: converged
    where doubling the training moves the error less than the seeds differ."""
    lines = []
    for family in args.families:
        rows = ROOT / args.rows
        base = _mae_by_point(rows / family)
        seed, long = _mae_by_point(rows / f"{family}-seed1"), _mae_by_point(rows / f"{family}-long")
        keys = sorted(set(seed) | set(long))
        if not keys:
            continue
        lines += [
            "",
            f"{family}: convergence checks (validation MAE, meV per molecule)",
            "",
            "| parameters | molecules | seed 0 | seed 1 | seed spread | 2x epochs | change |",
            "|---|---|---|---|---|---|---|",
        ]
        for key in keys:
            b, s1, lg = base.get(key), seed.get(key), long.get(key)
            cells = [
                "" if v is None else f"{v:.1f}"
                for v in (
                    b,
                    s1,
                    abs(s1 - b) if b and s1 else None,
                    lg,
                    lg - b if b and lg else None,
                )
            ]
            lines.append(f"| {key[0]:,} | {key[1]:,} | " + " | ".join(cells) + " |")
    return lines


def mae_table(title: str, rows: list[dict], column: str, labels: list[str]) -> list[str]:
    """Markdown lines of the validation MAE (meV per molecule): one row per parameter count,
    one column per sorted value of ``column`` (headed by ``labels``)."""
    values = sorted({r[column] for r in rows})
    lines = ["", title, "", "| parameters | " + " | ".join(labels) + " |"]
    lines.append("|---|" + "---|" * len(values))
    for n in sorted({r["parameters"] for r in rows}):
        cells = {r[column]: 1000 * r["energy_mae"] for r in rows if r["parameters"] == n}
        row = [f"{cells[v]:.1f}" if v in cells else "" for v in values]
        lines.append(f"| {n:,} | " + " | ".join(row) + " |")
    return lines


def isoflop_lines(family: str, rows: list[dict], iso: dict | None) -> list[str]:
    """The IsoFLOP profiles: validation MAE by parameters and budget, and each budget's
    minimum (N_opt) where the fit found one."""
    if not rows:
        return []
    budgets = sorted({r["budget"] for r in rows})
    title = (
        f"{family}: IsoFLOP profiles, validation energy MAE (meV per molecule) by parameters "
        "and training FLOPs (full training split)"
    )
    lines = mae_table(title, rows, "budget", [f"{c:.0e}" for c in budgets])
    if iso:
        opt = dict(zip(iso["budgets"], iso["n_opt"], strict=True))
        lines.append(
            "| N_opt | " + " | ".join(f"{opt[c]:,.0f}" if c in opt else "" for c in budgets) + " |"
        )
    return lines


ENVELOPE_BUDGETS = [1e12, 3e12, 1e13, 3e13]


def lower_envelope(rows: list[dict]) -> list[dict]:
    """The grid points, by training FLOPs, that beat every cheaper point's validation MAE:
    the best error reached within each amount of compute."""
    envelope: list[dict] = []
    for r in sorted(rows, key=lambda r: r["flops"]):
        if not envelope or r["energy_mae"] < envelope[-1]["energy_mae"]:
            envelope.append(r)
    return envelope


def envelope_lines(grids: dict[str, list[dict]]) -> list[str]:
    """Families at equal training compute: per budget, the lowest validation MAE of any grid
    point that spent no more FLOPs (with its parameters and molecules). The grid was not
    tuned to a budget, so each cell bounds the compute-optimal error from above."""
    if not grids:
        return []
    lines = [
        "",
        "Equal compute: the best grid point within each training-FLOP budget, validation "
        "MAE (meV per molecule), parameters / molecules",
        "",
        "| family | "
        + " | ".join(f"<= {c:.0e}".replace("e+", "e") for c in ENVELOPE_BUDGETS)
        + " |",
        "|---|" + "---|" * len(ENVELOPE_BUDGETS),
    ]
    for family, rows in grids.items():
        envelope, cells = lower_envelope(rows), []
        for budget in ENVELOPE_BUDGETS:
            best = next((r for r in reversed(envelope) if r["flops"] <= budget), None)
            cells.append(
                ""
                if best is None
                else f"{1000 * best['energy_mae']:.1f} ({best['parameters'] / 1e3:.0f}k / "
                f"{best['train_structures']:,})"
            )
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    return lines


def plot_compute(grids: dict[str, list[dict]], profiles: dict, path: Path) -> None:
    """Validation MAE against training FLOPs: every grid point of every family, each
    family's lower envelope, and the IsoFLOP minima where a family has them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for family, rows in grids.items():
        pts = [(r["flops"], 1000 * r["energy_mae"]) for r in rows]
        envelope = [(r["flops"], 1000 * r["energy_mae"]) for r in lower_envelope(rows)]
        line = ax.loglog(*zip(*pts, strict=True), "o", alpha=0.45, label=f"{family} grid")[0]
        ax.loglog(*zip(*envelope, strict=True), "-", color=line.get_color())
        rows_iso = profiles.get(family, ([], None))[0]
        if rows_iso:
            minima = {}
            for r in rows_iso:
                mae = 1000 * r["energy_mae"]
                minima[r["budget"]] = min(minima.get(r["budget"], mae), mae)
            c, mae = zip(*sorted(minima.items()), strict=True)
            ax.loglog(
                c, mae, "s--", color=line.get_color(), label=f"{family} IsoFLOP minima (seed 0)"
            )
    ax.set_xlabel("training FLOPs C")
    ax.set_ylabel("validation energy MAE (meV per molecule)")
    ax.set_title("QM9 U0: error against training compute")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(args) -> int:
    """One table of every family's exponents (from the per-family fit JSONs) beside the
    published ones: the table of benchmarks/results/scaling-qm9-cpu.md."""
    lines = [
        "| family | points | parameters | L(N) alpha | L(D) beta | joint alpha | joint beta "
        "| frontier a (joint) | frontier a (IsoFLOP) | log-RMS |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    summary, grids, profiles, notes = {}, {}, {}, []
    for family in args.families:
        path = ROOT / f"benchmarks/results/scaling-qm9-{family}-cpu.json"
        if not path.exists():
            continue
        doc = json.loads(path.read_text())
        fits = doc["fits"].get("energy", {})
        joint = fits.get("L(N, D)")
        grids[family] = [r for r in doc["points"] if not r.get("budget")]
        params = [r["parameters"] for r in grids[family]]
        iso = doc.get("frontier", {}).get("energy")
        profiles[family] = ([r for r in doc["points"] if r.get("budget")], iso)
        iso_a = ""
        if iso:
            iso_a = f"{_interval(iso['a'], iso['intervals'], 'a')} ({len(iso['budgets'])} budgets)"
        lines.append(
            f"| {family} | {len(params)} | {min(params):,}-{max(params):,} "
            f"| {_fit_interval(fits.get('L(N)'), 'alpha')} "
            f"| {_fit_interval(fits.get('L(D)'), 'alpha')} "
            f"| {_fit_interval(joint, 'alpha')} | {_fit_interval(joint, 'beta')} "
            f"| {_fit_interval(joint, 'a')} | {iso_a} "
            f"| {joint['log_rmse']:.3f} |"
            if joint
            else f"| {family} | {len(params)} | | | | too few points | | | | |"
        )
        summary[family] = {"points": len(params), "fits": fits, "isoflop_frontier": iso}
        noise = doc.get("seed_noise", {}).get("energy_per_structure", {})
        summary[family]["seed_noise"] = noise
        notes += [
            f"{family}: seed noise of the {part} points {100 * v['sigma_log']:.1f}% (log MAE, "
            f"{v['points']} points run with two seeds); the bootstrap draws it about the fit"
            for part, v in noise.items()
        ]
    lines += ["", *notes] if notes else []
    for family, rows in grids.items():  # the grid itself: validation MAE per molecule, meV
        sizes = sorted({r["train_structures"] for r in rows})
        title = (
            f"{family}: validation energy MAE (meV per molecule) by parameters and training "
            "molecules"
        )
        lines += mae_table(title, rows, "train_structures", [f"{d:,}" for d in sizes])
    lines += envelope_lines(grids)
    plot_compute(grids, profiles, ROOT / "benchmarks/results/scaling-qm9-compute.png")
    for family, (rows, iso) in profiles.items():
        lines += isoflop_lines(family, rows, iso)
    lines += convergence_lines(args)
    lines += ["", "| published | data | alpha | beta | frontier a |", "|---|---|---|---|---|"]
    for name, data, alpha, beta, a in PUBLISHED:
        cells = ["" if v is None else f"{v:.2f}" for v in (alpha, beta, a)]
        lines.append(f"| {name} | {data} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    out = ROOT / "benchmarks/results/scaling-qm9-cpu.json"
    out.write_text(json.dumps({"families": summary, "published": PUBLISHED}, indent=1))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", nargs="+", default=["painn", "egnn", "irrep"])
    p.add_argument("--sizes", nargs="+", type=int, default=SIZES, help="training molecules")
    p.add_argument("--widths", nargs="+", type=int, help="model.hidden values (default per family)")
    p.add_argument("--epochs", type=float, default=3.0, help="epochs at 110k molecules")
    p.add_argument("--gamma", type=float, default=0.5, help="epochs grow as (110k/D)^gamma")
    p.add_argument("--config", default="configs/scaling/qm9-cpu.yaml")
    p.add_argument("--jobs", type=int, default=2, help="points at once, one thread each")
    p.add_argument("--check", choices=["long", "seed"], help="the convergence points instead")
    p.add_argument("--set", nargs="*", default=[], help="overrides for every point")
    p.add_argument("--work", default="runs/scaling-qm9", help="the points' run folders")
    p.add_argument("--rows", default="benchmarks/results/scaling-qm9-rows")
    p.add_argument(
        "--budgets",
        nargs="+",
        type=float,
        help="FLOPs: the IsoFLOP profiles (every width, full data) instead of the grid",
    )
    p.add_argument("--fit", action="store_true", help="fit what has landed, per family")
    p.add_argument(
        "--report", action="store_true", help="every family's exponents beside published ones"
    )
    args = p.parse_args(argv)
    if args.report:
        return report(args)
    if args.fit:
        for family in args.families:
            cmd = [sys.executable, "tools/scaling_laws.py", "fit", f"{args.rows}/{family}"]
            cmd += ["--results", f"benchmarks/results/scaling-qm9-{family}-cpu"]
            repeats = [r.format(rows=args.rows, family=family) for r in REPEATS]
            cmd += ["--repeats", *(r for r in repeats if (ROOT / r).is_dir())]
            subprocess.call(cmd, cwd=ROOT)
        return 0
    failed = 0
    for family in args.families:
        for budget in args.budgets or []:
            failed |= isoflop(family, budget, args)
        for size in [] if args.budgets else args.sizes:
            if args.check == "long":
                failed |= sweep(family, size, args, [], tag="-long")
            elif args.check == "seed":
                failed |= sweep(family, size, args, ["train.seed=1"], tag="-seed1")
            else:
                failed |= sweep(family, size, args, [])
    return failed


if __name__ == "__main__":
    sys.exit(main())
