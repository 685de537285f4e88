#!/usr/bin/env python
"""Convert megagnn checkpoints.

    python tools/convert_checkpoint.py consolidate runs/x runs/x/consolidated
    python tools/convert_checkpoint.py package runs/x runs/x/model.pt2
    python tools/convert_checkpoint.py reshard runs/x runs/x-tp2pp2 --tensor 2 --pipeline 2

consolidate: a sharded training checkpoint saved under any tensor x pipeline x data layout
(a run folder, its checkpoints/ folder or one step-N folder) -> model.safetensors with the
unsharded weights under their global names + config.json. Memory stays at about the largest
single weight. The result loads with megagnn.inference.load_model and the ASE calculator.
A checkpoint whose save did not complete is never used (the run's `latest` names only
complete ones).

reshard: a sharded training checkpoint -> a new run folder holding the same training state
(weights, optimizer moments, schedule, data position) saved by the ranks of another
tensor x pipeline x data layout; `torchrun ... -m megagnn.pretrain --set train.out_dir=OUT
parallel.tensor=T parallel.pipeline=P` resumes from it. Launches its own torchrun with
T x P x D processes (or run it under torchrun yourself). A sharded checkpoint also resumes
under any layout without resharding; resharding writes one file set per new rank.

package: a checkpoint (sharded or consolidated) -> an inference package, the model with its
force and stress computation compiled ahead of time by AOTInductor (.pt2), for the ASE
calculator (MegaGNNCalculator("model.pt2")) and the C++ runner (megagnn_infer, built by
CMakeLists.txt). Needs a C++ compiler; takes about half a minute for small models.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from megagnn.checkpoint import CheckpointError, open_saved
from megagnn.checkpoint.sharded import dist_checkpointing
from megagnn.convert import consolidate


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
    c.add_argument(
        "--memory-report",
        metavar="FILE",
        help="write this process's resident memory (Linux) before consolidating and its "
        "peak above that to FILE (JSON), to check that conversion streams",
    )
    c.add_argument(
        "--trained-weights",
        action="store_true",
        help="write the trained weights even where the run kept a weight average "
        "(optim.ema_decay; by default the average is written)",
    )
    k = sub.add_parser("package", help="checkpoint -> AOTInductor inference package (.pt2)")
    k.add_argument("source", help="run, checkpoint, step-N or consolidated folder")
    k.add_argument("out", help="output file, ending in .pt2")
    k.add_argument(
        "--dtype",
        choices=("float64", "float32"),
        default="float64",
        help="precision of the compiled model (float64 keeps MD energy conserved)",
    )
    k.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the package runs (cuda: compiled on, and for, this machine's GPU)",
    )
    r = sub.add_parser("reshard", help="sharded checkpoint -> sharded for another layout")
    r.add_argument("source", help="run folder, checkpoints folder or step-N folder")
    r.add_argument("out", help="output run folder (its checkpoints/ is written)")
    r.add_argument("--tensor", type=int, default=1, help="tensor-parallel size of the output")
    r.add_argument("--pipeline", type=int, default=1, help="pipeline stages of the output")
    r.add_argument("--data", type=int, default=1, help="data-parallel size (sharded optimizer)")
    args = p.parse_args(argv)
    if args.command == "reshard":
        return reshard(args, argv if argv is not None else sys.argv[1:])
    try:
        if args.command == "consolidate":
            base = 0
            if args.memory_report:  # the libraries it reads with are not its memory
                dist_checkpointing()
                base = resident_bytes("VmRSS")
            path = consolidate(
                args.source,
                args.out,
                progress=not args.no_progress,
                average=not args.trained_weights,
            )
            if args.memory_report:
                report = {
                    "baseline_rss_bytes": base,
                    "peak_above_baseline_bytes": resident_bytes("VmHWM") - base,
                }
                Path(args.memory_report).write_text(json.dumps(report))
        else:
            from megagnn.inference import export_package

            if not args.out.endswith(".pt2"):
                raise ValueError(f"the package file must end in .pt2, not {args.out!r}")
            dtype = getattr(torch, args.dtype)
            saved = open_saved(args.source)
            model = saved.model(dtype=dtype)
            print(f"compiling {saved.path} ({args.dtype}, {args.device}) ...", file=sys.stderr)
            path = export_package(model, args.out, dtype, args.device, saved.config_dict)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def resident_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (the peak) of this process, from /proc. The peak, not
    ru_maxrss: in a process started by fork and exec, ru_maxrss starts from the parent's
    resident memory at the fork."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field} (Linux only)")


def reshard(args: argparse.Namespace, argv: list[str]) -> int:
    """Under torchrun (or for a one-process layout): do it here. Otherwise: relaunch this
    command under torchrun with the output layout's number of processes."""
    world = args.tensor * args.pipeline * args.data
    if min(args.tensor, args.pipeline, args.data) < 1:
        print("error: --tensor, --pipeline and --data must be >= 1", file=sys.stderr)
        return 2
    if "LOCAL_RANK" not in os.environ and world > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += [f"--nproc_per_node={world}", str(Path(__file__).resolve()), *argv]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        return subprocess.run(cmd, env=env).returncode
    from megagnn.config import ParallelConfig
    from megagnn.convert import reshard as reshard_checkpoint
    from megagnn.parallel.state import destroy_parallel, init_parallel

    if int(os.environ.get("WORLD_SIZE", "1")) != world:
        print(f"error: the layout needs {world} processes", file=sys.stderr)
        return 2
    par = init_parallel(ParallelConfig(tensor=args.tensor, pipeline=args.pipeline))
    try:
        path = reshard_checkpoint(args.source, args.out, par)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        destroy_parallel()
    if par.is_main:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
