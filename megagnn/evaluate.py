"""Evaluate a trained run on a split of its dataset (by default the held-out test split).

python -m megagnn.evaluate --run runs/quickstart [--split test] [--data other/dataset]
    [--predictions test.csv]
    (--run: a run, checkpoint or consolidated folder, or an inference package .pt2)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

import torch

from megagnn.checkpoint import CheckpointError, open_saved
from megagnn.config import ConfigError, config_from_dict
from megagnn.data.shards import DataError, atomic_write_json
from megagnn.elements import UnknownElementError, check_elements
from megagnn.inference.package import Package, PackagePotential
from megagnn.parallel.state import default_device, set_threads
from megagnn.precision import DTYPES
from megagnn.training.evaluation import evaluate
from megagnn.training.sources import DataSplits, dataset_entries, read_splits, recorded_run


def _load(source: str, which: str, device: torch.device):
    """(model, run config, step, dtype) of a run/checkpoint folder, a consolidated folder or
    an inference package."""
    if source.endswith(".pt2"):
        package = Package(source)
        if "run_config" not in package.metadata:
            raise ConfigError(
                f"{source} does not record its run's config (packaged before it was kept); "
                "evaluate the checkpoint or consolidated folder it came from"
            )
        config = json.loads(package.metadata["run_config"])
        return PackagePotential(package), config, -1, package.dtype
    saved = open_saved(source, which)
    dtype = DTYPES[saved.config.train.precision]
    return saved.model(device, dtype), saved.config_dict, saved.step, dtype


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="megagnn.evaluate",
        description="Mean absolute errors of a trained model on a dataset split, next to "
        "trivial baselines (reference energies only; zero forces and stress). Structures "
        "holding an element the model never trained on are refused, naming it.",
    )
    p.add_argument(
        "--run",
        required=True,
        help="run folder (its best or latest checkpoint), checkpoint folder, consolidated "
        "folder or inference package (.pt2)",
    )
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--data", help="dataset folder (default: the one the run trained on)")
    p.add_argument("--json", help="also write the metrics to this JSON file")
    p.add_argument(
        "--predictions",
        help="also write one CSV row per labelled structure: head, record (dataset index), "
        "record_id (the id in its source), atoms, predicted and reference energy (eV)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--threads", type=int, help="intra-op threads (default: every core this process may use)"
    )
    p.add_argument(
        "--checkpoint",
        choices=["best", "latest"],
        default="best",
        help="which checkpoint of a run folder: best (lowest validation loss, kept by runs "
        "with validate.patience; otherwise the latest) or latest (default: %(default)s)",
    )
    p.add_argument(
        "--allow-unknown-elements",
        action="store_true",
        help="evaluate structures with elements the model never trained on (their count is "
        "reported as unknown_element_structures) instead of refusing them",
    )
    args = p.parse_args(argv)
    try:
        print(set_threads(args.threads))
        device = default_device()
        model, config, step, dtype = _load(args.run, args.checkpoint, device)
        cfg = config_from_dict(config)
        if args.data:
            cfg.data.path = args.data
        # a multi-dataset run is evaluated on each of its datasets, through its own head
        entries = [(cfg.data.path, 0, 1.0)] if args.data else dataset_entries(cfg)
        metrics = {"split": args.split, "step": step}
        rows: list[tuple] = []
        run_dir = None if args.data or args.run.endswith(".pt2") else recorded_run(args.run)
        for path, head, _ in entries:
            recorded = None
            if run_dir is not None:  # the split the run trained with, not a recomputed one
                recorded = read_splits(run_dir, cfg.model.heads[head] if len(entries) > 1 else None)
            data = DataSplits(cfg, path=path, head=head, recorded=recorded)
            package = isinstance(model, PackagePotential)
            known = model.package.elements if package else model.elements(head)
            unknown, holding = data.unknown_elements(args.split, known)
            if unknown:
                check_elements(
                    unknown,
                    known,
                    f"{args.run} (head {cfg.model.heads[head]}, "
                    f"{holding} structures of the {args.split} split of {path})",
                    args.allow_unknown_elements,
                )
            sampler = data.sampler(args.split, shuffle=False)
            predictions = [] if args.predictions else None
            result = evaluate(
                model,
                data.graphs,
                sampler,
                device,
                dtype,
                progress=not args.no_progress,
                predictions=predictions,
            )
            if predictions:
                ids = data.dataset.record_ids()
                name = cfg.model.heads[head]
                rows += [(name, i, ids[i], n, p, r) for i, n, p, r in predictions]
            if package and not model.has_references:
                result = {k: v for k, v in result.items() if "baseline_energy" not in k}
            result["structures"] = len(data.indices[args.split])
            result["unknown_element_structures"] = holding
            prefix = f"{cfg.model.heads[head]}/" if len(entries) > 1 else ""
            metrics.update({prefix + k: v for k, v in result.items()})
    except (
        ConfigError,
        DataError,
        CheckpointError,
        UnknownElementError,
        ValueError,
        FileNotFoundError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.split} split" + (f", step {step}:" if step >= 0 else ":"))
    units = {"energy_per_atom": "eV/atom", "energy": "eV", "forces": "eV/Å", "stress": "eV/Å^3"}
    for key, value in metrics.items():
        if key.endswith(("_mae", "_rmse")):
            unit = next(u for k, u in units.items() if k in key.rsplit("/", 1)[-1])
            print(f"  {key:40s} {value:.5f} {unit}")
        elif key.endswith("structures") and (value or "unknown" not in key):
            print(f"  {key:40s} {value}")
    for key in [k for k in metrics if k.endswith("forces_mae") and "baseline" not in k]:
        prefix = key.removesuffix("forces_mae")
        ratio = metrics[key] / metrics[f"{prefix}baseline_zero_forces_mae"]
        print(f"  {prefix + 'force MAE / zero-force MAE':40s} {ratio:.3f}")
    if args.json:  # written whole or not at all (a sweep takes the file as "point done")
        atomic_write_json(args.json, metrics)
    if args.predictions:
        write_predictions(args.predictions, rows)
        print(f"  {len(rows)} predictions written to {args.predictions}")
    return 0


def write_predictions(path: str, rows: list[tuple]) -> None:
    """The per-structure CSV of ``--predictions``, written under a temporary name."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    with open(tmp, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["head", "record", "record_id", "atoms", "energy_pred_eV", "energy_ref_eV"])
        for head, record, record_id, atoms, pred, ref in rows:
            out.writerow([head, record, record_id, atoms, repr(pred), repr(ref)])
    os.replace(tmp, path)


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    sys.exit(main())
