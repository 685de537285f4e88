#!/usr/bin/env python
"""Where a training step spends its time: the torch profiler around a few Trainer steps of a
named model size (conservative forces and stress, fp32, one thread), eager or compiled, on
the batches that benchmarks/compile_step.py makes (its --work folder). Compiled kernels are
named in the table (Inductor's kernel profiling is on).

    python benchmarks/profile_step.py irrep-1m --data emt --compile --steps 8 --top 30
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("size", help="a configs/model/ name, e.g. irrep-1m")
    p.add_argument("--data", default="emt", help="a dataset under --work (compile_step.py's)")
    p.add_argument("--work", default="runs/compile-bench")
    p.add_argument("--compile", action="store_true", help="train.compile=true")
    p.add_argument("--steps", type=int, default=8, help="profiled steps (after 4 warm-up ones)")
    p.add_argument("--top", type=int, default=25, help="operators and kernels listed")
    args = p.parse_args(argv)

    import torch
    import torch._inductor.config as inductor_config
    from compile_step import trainer_for  # benchmarks/, this script's folder
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(1)
    inductor_config.cpp.enable_kernel_profile = True
    data = ROOT / args.work / args.data / "processed"
    with tempfile.TemporaryDirectory() as tmp:
        trainer = trainer_for(args.size, data, 256, args.compile, tmp)
        stream = trainer.sources[0].batches()
        batches = [next(stream) for _ in range(args.steps + 4)]
        started = time.perf_counter()
        trainer.train_step(batches[:1])
        print(f"first step (compiles when --compile): {time.perf_counter() - started:.1f} s")
        for batch in batches[1:4]:
            trainer.train_step([batch])
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            started = time.perf_counter()
            for batch in batches[4:]:
                trainer.train_step([batch])
            print(f"step: {(time.perf_counter() - started) / args.steps:.3f} s (mean)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
