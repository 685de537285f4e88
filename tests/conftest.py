import os

import torch

# Triton kernels run through the interpreter on machines without CUDA; the variable must be
# set before megagnn.kernels is imported (the kernels are decorated at import).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import ase.io
import pytest

from megagnn.data.emt import generate
from megagnn.data.preprocess import preprocess


@pytest.fixture(scope="session")
def emt_extxyz(tmp_path_factory):
    """A small EMT-labelled extxyz file (rattled cells and MD snapshots)."""
    path = tmp_path_factory.mktemp("raw") / "emt.extxyz"
    ase.io.write(path, list(generate(40, seed=1, md_fraction=0.3, progress=False)))
    return path


@pytest.fixture(scope="session")
def emt_dataset(tmp_path_factory, emt_extxyz):
    """The small EMT data preprocessed into two shards with edge counts at 4 Å."""
    out = tmp_path_factory.mktemp("processed") / "emt"
    preprocess([str(emt_extxyz)], out, shard_size=25, cutoff=4.0, progress=False)
    return out
