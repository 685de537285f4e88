"""Evaluate a trained run on a split of its dataset (by default the held-out test split).

python -m megagnn.evaluate --run runs/quickstart [--split test] [--data other/dataset]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from megagnn.config import ConfigError, config_from_dict
from megagnn.data.shards import DataError
from megagnn.inference.calculator import load_model
from megagnn.training.checkpoint import CheckpointError, read_common
from megagnn.training.trainer import DTYPES, DataSplits, default_device, evaluate


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
    args = p.parse_args(argv)
    try:
        state = read_common(args.run)
        cfg = config_from_dict(state["config"])
        if args.data:
            cfg.data.path = args.data
        device, dtype = default_device(), DTYPES[cfg.train.precision]
        model = load_model(args.run, device, dtype)
        data = DataSplits(cfg)
        metrics = evaluate(
            model,
            data.graphs,
            data.sampler(args.split, shuffle=False),
            device,
            dtype,
            progress=True,
        )
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    metrics = {
        "split": args.split,
        "structures": len(data.indices[args.split]),
        "step": state["step"],
        **metrics,
    }
    print(f"{args.split} split, {metrics['structures']} structures, step {state['step']}:")
    units = {"energy": "eV/atom", "forces": "eV/Å", "stress": "eV/Å^3"}
    for key, value in metrics.items():
        if key.endswith("_mae"):
            unit = next(u for k, u in units.items() if k in key)
            print(f"  {key:32s} {value:.5f} {unit}")
    if "forces_mae" in metrics:
        ratio = metrics["forces_mae"] / metrics["baseline_zero_forces_mae"]
        print(f"  force MAE / zero-force MAE       {ratio:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(metrics, f, indent=2)
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    sys.exit(main())
