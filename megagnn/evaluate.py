"""Evaluate a trained run on a split of its dataset (by default the held-out test split).

python -m megagnn.evaluate --run runs/quickstart [--split test] [--data other/dataset]
"""

from __future__ import annotations

import argparse
import sys

import torch

from megagnn.config import ConfigError, config_from_dict
from megagnn.data.shards import DataError, atomic_write_json
from megagnn.inference.calculator import load_model
from megagnn.training.build import DTYPES, default_device
from megagnn.training.checkpoint import CheckpointError, read_common, resolve
from megagnn.training.evaluation import evaluate
from megagnn.training.sources import DataSplits, dataset_entries, read_splits, recorded_run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="megagnn.evaluate",
        description="Mean absolute errors of a checkpoint on a dataset split, next to trivial "
        "baselines (reference energies only; zero forces and stress).",
    )
    p.add_argument(
        "--run", required=True, help="run folder (its latest checkpoint) or a checkpoint folder"
    )
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--data", help="dataset folder (default: the one the run trained on)")
    p.add_argument("--json", help="also write the metrics to this JSON file")
    p.add_argument(
        "--checkpoint",
        choices=["best", "latest"],
        default="best",
        help="which checkpoint of a run folder: best (lowest validation loss, kept by runs "
        "with train.patience; otherwise the latest) or latest (default: %(default)s)",
    )
    args = p.parse_args(argv)
    try:
        checkpoint = resolve(args.run, args.checkpoint)
        state = read_common(checkpoint)
        cfg = config_from_dict(state["config"])
        if args.data:
            cfg.data.path = args.data
        device, dtype = default_device(), DTYPES[cfg.train.precision]
        model = load_model(checkpoint, device, dtype)
        # a multi-dataset run is evaluated on each of its datasets, through its own head
        entries = [(cfg.data.path, 0, 1.0)] if args.data else dataset_entries(cfg)
        metrics = {"split": args.split, "step": state["step"]}
        run_dir = None if args.data else recorded_run(args.run)
        for path, head, _ in entries:
            recorded = None
            if run_dir is not None:  # the split the run trained with, not a recomputed one
                recorded = read_splits(run_dir, cfg.model.heads[head] if len(entries) > 1 else None)
            data = DataSplits(cfg, path=path, head=head, recorded=recorded)
            sampler = data.sampler(args.split, shuffle=False)
            result = evaluate(model, data.graphs, sampler, device, dtype, progress=True)
            result["structures"] = len(data.indices[args.split])
            prefix = f"{cfg.model.heads[head]}/" if len(entries) > 1 else ""
            metrics.update({prefix + k: v for k, v in result.items()})
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.split} split, step {state['step']}:")
    units = {"energy": "eV/atom", "forces": "eV/Å", "stress": "eV/Å^3"}
    for key, value in metrics.items():
        if key.endswith("_mae"):
            unit = next(u for k, u in units.items() if k in key.rsplit("/", 1)[-1])
            print(f"  {key:40s} {value:.5f} {unit}")
        elif key.endswith("structures"):
            print(f"  {key:40s} {value}")
    for key in [k for k in metrics if k.endswith("forces_mae") and "baseline" not in k]:
        prefix = key.removesuffix("forces_mae")
        ratio = metrics[key] / metrics[f"{prefix}baseline_zero_forces_mae"]
        print(f"  {prefix + 'force MAE / zero-force MAE':40s} {ratio:.3f}")
    if args.json:  # written whole or not at all (a sweep takes the file as "point done")
        atomic_write_json(args.json, metrics)
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    sys.exit(main())
