"""Pretrain a potential.

    torchrun --nproc_per_node=N -m megagnn.pretrain --config configs/quickstart.yaml \
        [--set train.max_steps=100 model.hidden=128 parallel.tensor=2 ...]

N = tensor x pipeline x data-parallel size; data parallelism takes what the layout leaves.
"""

from __future__ import annotations

import argparse
import sys

from megagnn.checkpoint import CheckpointError
from megagnn.config import ConfigError, field_help, load_config
from megagnn.data.shards import DataError


class _Parser(argparse.ArgumentParser):
    def format_help(self) -> str:
        """The usage, then every config field: read from the config's source only when help
        is shown (about 0.1 s, which a launch need not pay)."""
        self.epilog = "config fields (YAML keys, or --set section.field=value):\n" + field_help()
        return super().format_help()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _Parser(
        prog="megagnn.pretrain",
        description="Train a GNN interatomic potential on a preprocessed dataset. A run is a "
        "YAML config plus dotted overrides; it resumes from its out_dir when checkpoints exist.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML config (may include others)")
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="overrides such as optim.lr=3e-4 model.family=schnet (values parsed as YAML)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        from megagnn.parallel.state import destroy_parallel, init_parallel, set_threads
        from megagnn.training.trainer import Trainer

        threads = set_threads(cfg.train.threads)
        parallel = init_parallel(cfg.parallel)
        if parallel.is_main:
            print(threads)
        trainer = Trainer(cfg, parallel)
        trainer.train()
        destroy_parallel()
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    trainer.log(f"done: {trainer.step} steps, checkpoints in {trainer.ckpt_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
