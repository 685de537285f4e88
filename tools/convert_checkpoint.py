#!/usr/bin/env python
"""Convert megagnn checkpoints.

    python tools/convert_checkpoint.py consolidate runs/x runs/x/consolidated

consolidate: a sharded training checkpoint saved under any tensor x pipeline x data layout
(a run folder, its checkpoints/ folder or one step-N folder) -> model.safetensors with the
unsharded weights under their global names + config.json. Memory stays at about the largest
single weight. The result loads with megagnn.inference.load_model and the ASE calculator.
A checkpoint whose save did not complete is never used (the run's `latest` names only
complete ones). Resharding needs no conversion: a sharded checkpoint resumes under any
layout directly.
"""

import argparse
import sys

from megagnn.convert import consolidate
from megagnn.training.checkpoint import CheckpointError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("consolidate", help="sharded checkpoint -> model.safetensors + config")
    c.add_argument("source", help="run folder, checkpoints folder or step-N folder")
    c.add_argument("out", help="output folder")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        path = consolidate(args.source, args.out, progress=not args.no_progress)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
