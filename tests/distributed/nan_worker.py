"""Run under torchrun: a non-finite loss on one data-parallel rank skips the step on every
rank, whatever ``parallel.data_parallel`` does with gradients.

    torchrun --nproc_per_node=2 tests/distributed/nan_worker.py --set data.path=... ...
"""

import math
import sys

import torch

from megagnn import keys as K
from megagnn.config import load_config
from megagnn.parallel.state import destroy_parallel, init_parallel
from megagnn.training.trainer import Trainer


def main() -> int:
    assert sys.argv[1] == "--set"
    cfg = load_config(None, sys.argv[2:])
    par = init_parallel(cfg.parallel)
    trainer = Trainer(cfg, par)

    def weights():
        return [p.detach().clone() for p in trainer.model.parameters()]

    outcomes = []
    for step in range(3):
        batches = trainer.next_batches()
        if step == 1 and par.dp_rank == 1:  # one replica's loss only
            for batch in batches:
                batch[K.ENERGY][:] = math.nan
        before = weights()
        outcomes.append(trainer.train_step(batches) is not None)
        changed = any(not torch.equal(a, b) for a, b in zip(before, weights(), strict=True))
        assert changed == outcomes[-1], (step, outcomes, changed)
    assert outcomes == [True, False, True], outcomes
    # the replicas still hold the same weights
    for p in weights():
        gathered = [torch.empty_like(p) for _ in range(par.dp_size)]
        torch.distributed.all_gather(gathered, p, group=par.dp_group)
        assert all(torch.equal(g, p) for g in gathered)
    if par.is_main:
        print(f"NAN GUARD PASSED ({type(trainer.optimizer).__name__})")
    destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
