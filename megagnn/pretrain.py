"""Pretrain a potential.

    torchrun --nproc_per_node=1 -m megagnn.pretrain --config configs/quickstart.yaml \
        [--set train.max_steps=100 model.hidden=128 ...]
"""

from __future__ import annotations

import argparse
import os
import sys

from megagnn.config import ConfigError, load_config
from megagnn.data.shards import DataError
from megagnn.training.checkpoint import CheckpointError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="megagnn.pretrain",
        description="Train a GNN interatomic potential on a preprocessed dataset. A run is a "
        "YAML config plus dotted overrides; it resumes from its out_dir when checkpoints exist.",
    )
    p.add_argument("--config", help="YAML config (may include others)")
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="overrides such as train.lr=3e-4 model.family=schnet (values parsed as YAML)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world != 1:
            raise ConfigError(
                f"WORLD_SIZE={world}: this build trains on one process; "
                "use torchrun --nproc_per_node=1"
            )
        from megagnn.training.trainer import Trainer

        trainer = Trainer(cfg)
        trainer.train()
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done: {trainer.step} steps, checkpoints in {trainer.ckpt_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
