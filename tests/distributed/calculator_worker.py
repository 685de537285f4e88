"""Under torchrun (gloo, tensor=2): one periodic structure evaluated through the ASE
calculator across the tensor-parallel group, atoms split between blocks and edges in
chunks, must give the energy, forces and stress of the whole model in one process.

    torchrun --nproc_per_node 2 tests/distributed/calculator_worker.py FOLDER FAMILY...

Rank 0 writes each family's consolidated model (random weights) to FOLDER first."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from ase.build import bulk

from megagnn.checkpoint import consolidated
from megagnn.config import Config, ModelConfig, ParallelConfig, config_to_dict
from megagnn.inference.calculator import MegaGNNCalculator
from megagnn.models import build_model
from megagnn.parallel.state import destroy_parallel, init_parallel


def save(folder: Path, family: str) -> None:
    cfg = Config(
        model=ModelConfig(
            family=family,
            hidden=16,
            layers=2,
            num_rbf=8,
            radial_hidden=8,
            cutoff=4.0,
            lmax=2,
            stress=True,
        )
    )
    torch.manual_seed(0)
    model = build_model(cfg.model).double()
    model.set_statistics(0, {29: -3.7, 79: -3.1}, 0.5, 12.0)
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    folder.mkdir(parents=True)
    entries = [(k, tuple(v.shape), v.dtype) for k, v in weights.items()]
    consolidated.write_weights(folder / consolidated.WEIGHTS, entries, weights.__getitem__, {})
    consolidated.write_config(folder, {"config": config_to_dict(cfg), "step": 0})


def main() -> None:
    out, families = Path(sys.argv[1]), sys.argv[2:]
    par = init_parallel(ParallelConfig(tensor=2))
    if par.rank == 0:
        for family in families:
            save(out / family, family)
    dist.barrier()
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True) * (3, 3, 2)
    del atoms[5]  # 71 atoms: node-parallel regions pad an odd count
    atoms.numbers[::7] = 79
    atoms.rattle(0.1, seed=1)
    for family in families:
        results = []
        for parallel in (None, par):
            # 300 edges a chunk: the structure's ~3,800 edges go in 13 chunks
            calc = MegaGNNCalculator(out / family, parallel=parallel, edge_chunk=300)
            atoms.calc = calc
            results.append((atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()))
        (e0, f0, s0), (e1, f1, s1) = results
        assert abs(f0).max() > 1e-5 and abs(s0).max() > 1e-7  # something to compare
        assert abs(e1 - e0) < 1e-10 * abs(e0), (family, e0, e1)
        assert abs(f1 - f0).max() < 1e-8 * abs(f0).max(), (family, abs(f1 - f0).max())
        assert abs(s1 - s0).max() < 1e-8 * abs(s0).max(), (family, abs(s1 - s0).max())
        if par.rank == 0:
            print(f"{family}: E {e0:.6f} eV, |F| max {abs(f0).max():.2e}, tensor=2 matches")
    destroy_parallel()


if __name__ == "__main__":
    main()
