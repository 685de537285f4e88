#!/usr/bin/env python
"""Train a MACE (mace-torch) on a split's extxyz files for a wall-clock budget and report its
test errors as JSON: the baseline of benchmarks/architectures.py.

Runs in its own environment, because mace-torch pins e3nn 0.4.4 and megagnn needs e3nn 0.5+:

    python -m venv .venv-mace
    .venv-mace/bin/pip install torch==2.13.0 mace-torch==0.3.16
    .venv-mace/bin/python benchmarks/mace_baseline.py --split runs/split --channels 32 \\
        --budget 300 --out mace.json
    .venv-mace/bin/python benchmarks/mace_baseline.py --throughput 4000 --channels 64 \\
        --device cuda --out mace-throughput.json      # step time only

The inputs are tools/export_split.py's train/val/test.extxyz (labels under REF_*), so MACE
sees exactly the structures megagnn trains and tests on. The model is MACE's own
(ScaleShiftMACE as `mace_run_train` builds it, with its defaults: two residual interactions,
correlation 3, Y up to l = 3, 8 Bessel functions, radial MLP [64, 64, 64]) and so are its
statistics (least-squares E0s, average neighbour count, force RMS scale and mean energy
shift, all from the training split) and its optimizer (Adam with AMSGrad, lr 0.01, weight
decay 5e-7, gradient clip 10, weight average 0.99). What is shared with megagnn so that the
comparison is of architectures: float32, the same loss (per-atom energy, force and virial
per atom, each divided by the force-RMS scale; weights as given), batches of about the same
atom budget, and a linear warmup then a cosine decay that follows the elapsed share of the
budget (megagnn's train.time_budget). Graphs are built before the clock starts (megagnn
reads them precomputed too); the test pass uses the weight average.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch


def to_graphs(atoms, keyspec, z_table, cutoff, data_mod):
    """MACE's configurations and graphs of ``atoms``; stress counts only for periodic cells
    that carry one."""
    configs = data_mod.config_from_atoms_list(atoms, key_specification=keyspec)
    graphs = [data_mod.AtomicData.from_config(c, z_table=z_table, cutoff=cutoff) for c in configs]
    for a, g in zip(atoms, graphs, strict=True):
        g.stress_weight = torch.tensor(float("REF_stress" in a.info and a.pbc.all()))
    return configs, graphs


def build(args, z_table, e0s, avg_neighbors, mean, rms):
    from e3nn import o3
    from mace import modules

    irreps = " + ".join(
        f"{args.channels}x{l}{'e' if l % 2 == 0 else 'o'}" for l in range(args.max_L + 1)
    )
    block = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
    return modules.ScaleShiftMACE(
        r_max=args.cutoff,
        num_bessel=8,
        num_polynomial_cutoff=5,
        max_ell=3,
        interaction_cls=block,
        interaction_cls_first=block,
        num_interactions=args.interactions,
        num_elements=len(z_table),
        hidden_irreps=o3.Irreps(irreps),
        MLP_irreps=o3.Irreps("16x0e"),
        atomic_energies=np.array([e0s.get(z, 0.0) for z in z_table.zs]),
        avg_num_neighbors=avg_neighbors,
        atomic_numbers=z_table.zs,
        correlation=args.correlation,
        gate=torch.nn.functional.silu,
        radial_MLP=[64, 64, 64],
        atomic_inter_scale=rms,
        atomic_inter_shift=mean,
    )


def loss_fn(out, batch, scale, args):
    """megagnn's loss (megagnn/training/loss.py), each term divided by the scale."""
    n = batch.ptr[1:] - batch.ptr[:-1]
    e = ((out["energy"] - batch.energy) / n / scale).square().mean()
    f = ((out["forces"] - batch.forces) / scale).square().mean()
    total = args.energy_weight * e + args.force_weight * f
    mask = batch.stress_weight > 0
    if mask.any():
        # the virial per atom, -stress x volume / n (MACE's stress divides by a zero volume
        # for molecules, whose gradient is then NaN: go through the virials instead)
        volume = torch.linalg.det(batch.cell.view(-1, 3, 3)).abs()[mask]
        ref = batch.stress[mask] * volume[:, None, None]
        err = (-out["virials"][mask] - ref) / (n[mask] * scale)[:, None, None]
        total = total + args.stress_weight * err.square().mean()
    return total


def errors(model, loader) -> dict[str, float]:
    sums = {"energy_per_atom_mae": 0.0, "forces_mae": 0.0, "stress_mae": 0.0}
    counts = dict.fromkeys(sums, 0)
    for batch in loader:
        out = model(batch.to_dict(), training=False, compute_force=True, compute_stress=True)
        n = batch.ptr[1:] - batch.ptr[:-1]
        err = {
            "energy_per_atom_mae": ((out["energy"] - batch.energy) / n).detach(),
            "forces_mae": (out["forces"] - batch.forces).detach(),
            "stress_mae": (out["stress"] - batch.stress).detach()[batch.stress_weight > 0],
        }
        for k, v in err.items():
            sums[k] += float(v.abs().sum())
            counts[k] += v.numel()
    return {k: sums[k] / counts[k] if counts[k] else float("nan") for k in sums}


def throughput(args) -> dict:
    """Training-step time of MACE on one periodic CuAu cell of about ``args.throughput``
    atoms, 30% Au, rattled: the structure tools/profile_throughput.py times megagnn on. The
    loss is energy + forces through autograd (no stress) and the optimizer Adam, on
    ``args.device``; the median of ``args.steps`` steps after one warm-up step."""
    import statistics

    from ase.build import bulk
    from mace import data as data_mod
    from mace import modules, tools
    from mace.tools.torch_geometric.dataloader import DataLoader

    device = torch.device(args.device)
    reps = max(1, round((args.throughput / 4) ** (1 / 3)))
    atoms = bulk("Cu", "fcc", a=3.7, cubic=True) * (reps, reps, reps)
    rng = np.random.default_rng(args.seed)
    atoms.numbers[rng.random(len(atoms)) < 0.3] = 79
    atoms.rattle(0.05, seed=args.seed)
    atoms.info["REF_energy"] = -3.5 * len(atoms)
    atoms.arrays["REF_forces"] = rng.normal(0, 0.3, (len(atoms), 3))
    keyspec = data_mod.KeySpecification(
        info_keys={"energy": "REF_energy"}, arrays_keys={"forces": "REF_forces"}
    )
    z_table = tools.AtomicNumberTable([29, 79])
    _, graphs = to_graphs([atoms], keyspec, z_table, args.cutoff, data_mod)
    loader = DataLoader(graphs, batch_size=1)
    avg_neighbors = float(modules.compute_avg_num_neighbors(loader))
    args.channels = int(args.channels)
    model = build(args, z_table, {}, avg_neighbors, 0.0, 1.0).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    batch = next(iter(loader)).to(device)
    n = len(atoms)

    def step() -> None:
        out = model(batch.to_dict(), training=True, compute_force=True)
        loss = ((out["energy"] - batch.energy) / n).square().mean()
        loss = loss + (out["forces"] - batch.forces).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step()  # warm-up
    times = []
    for _ in range(args.steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {
        "family": "mace",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "parameters": sum(q.numel() for q in model.parameters()),
        "channels": args.channels,
        "max_L": args.max_L,
        "atoms": n,
        "edges": int(batch.edge_index.shape[1]),
        "avg_num_neighbors": avg_neighbors,
        "step_time_s": median,
        "step_times_s": times,
        "atoms_per_s": n / median,
    }


def step_time(args) -> dict:
    """Training structures per second of MACE on the structures of ``args.step_time`` (an
    extxyz with energy, forces and stress results, as tools/generate_*_data.py write them):
    batches of about ``args.max_atoms`` atoms in file order, the training loop's loss
    (energy, forces, virials) and optimizer, one warm-up step, then the median of
    ``args.steps`` steps. With ``args.target_parameters`` the channels are those whose
    parameter count is nearest to it (on a log scale)."""
    import statistics

    import ase.io
    from mace import data as data_mod
    from mace import modules, tools
    from mace.tools.torch_geometric.dataloader import DataLoader

    atoms = ase.io.read(args.step_time, ":")
    for a in atoms:  # calculator results -> the REF_* keys MACE reads
        a.info["REF_energy"] = a.get_potential_energy()
        a.arrays["REF_forces"] = a.get_forces()
        if a.pbc.all():
            a.info["REF_stress"] = a.get_stress(voigt=False)
    keyspec = data_mod.KeySpecification(
        info_keys={"energy": "REF_energy", "stress": "REF_stress"},
        arrays_keys={"forces": "REF_forces"},
    )
    z_table = tools.AtomicNumberTable(sorted({int(z) for a in atoms for z in a.numbers}))
    _, graphs = to_graphs(atoms, keyspec, z_table, args.cutoff, data_mod)
    batch_size = max(1, round(args.max_atoms / np.mean([len(a) for a in atoms])))
    loader = DataLoader(graphs, batch_size=batch_size, shuffle=False, drop_last=True)
    avg_neighbors = float(modules.compute_avg_num_neighbors(loader))
    counts = {}
    for c in [int(args.channels)] if not args.target_parameters else range(8, 257, 4):
        args.channels = c
        model = build(args, z_table, {}, avg_neighbors, 0.0, 1.0)
        counts[c] = sum(q.numel() for q in model.parameters())
    args.channels = min(
        counts, key=lambda c: abs(math.log(counts[c] / (args.target_parameters or counts[c])))
    )
    torch.manual_seed(args.seed)
    model = build(args, z_table, {}, avg_neighbors, 0.0, 1.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, amsgrad=True)
    batches = list(loader)[: args.steps + 1]
    if len(batches) < args.steps + 1:
        raise SystemExit(
            f"{args.step_time}: {len(batches)} batches, --steps needs {args.steps + 1}"
        )

    def step(batch) -> None:
        out = model(batch.to_dict(), training=True, compute_force=True, compute_virials=True)
        loss = loss_fn(out, batch, 1.0, args)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()

    step(batches[0])  # warm-up
    times = []
    for batch in batches[1:]:
        t0 = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {
        "family": "mace",
        "parameters": counts[args.channels],
        "channels": args.channels,
        "max_L": args.max_L,
        "correlation": args.correlation,
        "batch_structures": batch_size,
        "atoms_per_step": float(np.mean([b.num_nodes for b in batches[1:]])),
        "step_time_s": median,
        "step_times_s": times,
        "structures_per_s": batch_size / median,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--split", help="folder with train/val/test.extxyz (not with --throughput)")
    p.add_argument(
        "--throughput",
        type=int,
        metavar="ATOMS",
        help="time training steps on one cell of about ATOMS atoms instead of training on a "
        "split (megagnn's counterpart: tools/profile_throughput.py --atoms ATOMS)",
    )
    p.add_argument(
        "--step-time",
        metavar="EXTXYZ",
        help="time training steps on batches of these structures (energy, forces and stress "
        "as calculator results) and report structures/s",
    )
    p.add_argument(
        "--target-parameters",
        type=float,
        help="with --step-time: the channels whose parameter count is nearest to this",
    )
    p.add_argument(
        "--steps", type=int, default=10, help="with --throughput or --step-time: timed steps"
    )
    p.add_argument("--device", default="cpu", help="with --throughput: cpu or cuda")
    p.add_argument(
        "--channels",
        default="32",
        help="channels of every hidden degree (with --count-only, a comma list)",
    )
    p.add_argument("--max-L", type=int, default=1, help="highest degree of the hidden features")
    p.add_argument("--interactions", type=int, default=2)
    p.add_argument("--correlation", type=int, default=3)
    p.add_argument("--cutoff", type=float, default=5.0)
    p.add_argument("--budget", type=float, default=300.0, help="training wall time (s)")
    p.add_argument("--max-atoms", type=int, default=256, help="atoms per batch (mean)")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--min-lr-ratio", type=float, default=0.01)
    p.add_argument("--energy-weight", type=float, default=5.0)
    p.add_argument("--force-weight", type=float, default=10.0)
    p.add_argument("--stress-weight", type=float, default=1.0)
    p.add_argument("--weight-decay", type=float, default=5e-7)
    p.add_argument("--ema-decay", type=float, default=0.99)
    p.add_argument(
        "--eval-every-s",
        type=float,
        default=0.0,
        help="validate the average this often (0: only at the end)",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--count-only", action="store_true", help="print the parameter count")
    p.add_argument("--out", help="write the result JSON here")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(args.seed)
    if args.throughput is not None or args.step_time:
        result = throughput(args) if args.throughput is not None else step_time(args)
        text = json.dumps(result, indent=1)
        if args.out:
            Path(args.out).write_text(text)
        print(text)
        return 0
    if args.split is None:
        p.error("give --split (or --throughput ATOMS)")
    from mace import data as data_mod
    from mace import modules, tools
    from mace.tools.torch_geometric.dataloader import DataLoader

    split = Path(args.split)
    keyspec = data_mod.KeySpecification(
        info_keys={"energy": "REF_energy", "stress": "REF_stress"},
        arrays_keys={"forces": "REF_forces"},
    )
    import ase.io

    atoms = {f: ase.io.read(split / f"{f}.extxyz", ":") for f in ("train", "val", "test")}
    zs = sorted({int(z) for structures in atoms.values() for a in structures for z in a.numbers})
    z_table = tools.AtomicNumberTable(zs)
    train_cfg, train = to_graphs(atoms["train"], keyspec, z_table, args.cutoff, data_mod)
    _, val = to_graphs(atoms["val"], keyspec, z_table, args.cutoff, data_mod)
    _, test = to_graphs(atoms["test"], keyspec, z_table, args.cutoff, data_mod)
    mean_atoms = np.mean([len(a) for a in atoms["train"]])
    batch_size = max(1, round(args.max_atoms / mean_atoms))
    loader = DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True)
    e0s = data_mod.compute_average_E0s(train_cfg, z_table)
    avg_neighbors = float(modules.compute_avg_num_neighbors(loader))
    e0_array = np.array([e0s.get(z, 0.0) for z in zs])
    mean, rms = modules.compute_mean_rms_energy_forces(loader, e0_array)
    mean, rms = float(np.ravel(mean)[0]), float(np.ravel(rms)[0])
    if args.count_only:
        counts = {}
        for c in args.channels.split(","):
            args.channels = int(c)
            model = build(args, z_table, e0s, avg_neighbors, mean, rms)
            counts[c] = sum(q.numel() for q in model.parameters())
        print(json.dumps(counts))
        return 0
    args.channels = int(args.channels)
    model = build(args, z_table, e0s, avg_neighbors, mean, rms)
    params = sum(q.numel() for q in model.parameters())

    average = copy.deepcopy(model)
    opt = torch.optim.Adam(
        model.parameters(), lr=args.lr, amsgrad=True, weight_decay=args.weight_decay
    )
    val_loader = DataLoader(val, batch_size=batch_size, shuffle=False)
    history = []
    step, atoms_seen, start, longest = 0, 0, time.perf_counter(), 0.0
    next_eval = args.eval_every_s or math.inf
    done = False
    while not done:
        for batch in loader:
            t0 = time.perf_counter()
            elapsed = t0 - start
            if elapsed + longest > args.budget:
                done = True
                break
            share = min(1.0, elapsed / args.budget)
            if step < args.warmup_steps:
                lr = args.lr * (step + 1) / args.warmup_steps
            else:
                lr = args.lr * (
                    args.min_lr_ratio
                    + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * share))
                )
            for g in opt.param_groups:
                g["lr"] = lr
            out = model(batch.to_dict(), training=True, compute_force=True, compute_virials=True)
            loss = loss_fn(out, batch, rms, args)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            d = min(args.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for a, q in zip(average.parameters(), model.parameters(), strict=True):
                    a.mul_(d).add_(q.detach(), alpha=1 - d)
            step += 1
            atoms_seen += batch.num_nodes
            longest = max(longest, time.perf_counter() - t0)
            if time.perf_counter() - start > next_eval:
                history.append(
                    {
                        "step": step,
                        "time_s": time.perf_counter() - start,
                        **errors(average, val_loader),
                    }
                )
                next_eval += args.eval_every_s
    train_s = time.perf_counter() - start
    structures = step * batch_size
    test_loader = DataLoader(test, batch_size=batch_size, shuffle=False)
    result = {
        "family": "mace",
        "parameters": params,
        "channels": args.channels,
        "max_L": args.max_L,
        "steps": step,
        "train_time_s": train_s,
        "structures_per_s": structures / train_s,
        "atoms_per_s": atoms_seen / train_s,
        "batch_structures": batch_size,
        "avg_num_neighbors": avg_neighbors,
        "val_history": history,
        **errors(average, test_loader),
    }
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
