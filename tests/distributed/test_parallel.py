"""Tensor/pipeline/data-parallel equivalence with the unsharded model, on CPU with gloo.

Each layout runs tests/distributed/worker.py under torchrun; the worker asserts outputs,
loss, every gradient (conservative-force loss included; pipelines train direct forces and
energies over two 1F1B microbatches), the clipped norm and one AdamW step against the
single-device model built from the same seed on each rank.
"""

from pathlib import Path

import pytest
from launch import torchrun

WORKER = Path(__file__).with_name("worker.py")


@pytest.mark.parametrize(
    "nproc, tensor, pipeline, nodes",
    [
        (2, 2, 1, 0),
        (2, 1, 1, 0),
        (4, 2, 1, 0),
        (2, 1, 2, 0),
        (4, 2, 2, 0),
        (2, 2, 1, 1),
        (4, 2, 2, 1),
    ],
    ids=["tp2", "dp2", "tp2xdp2", "pp2", "tp2xpp2", "tp2-nodes", "tp2xpp2-nodes"],
)
def test_parallel_matches_single_process(nproc, tensor, pipeline, nodes):
    """``-nodes``: with node-parallel regions (atoms split over the TP ranks between blocks;
    the batches have odd atom counts, so padding is exercised). Every family runs every
    two-process layout and TP2 x PP2; the other four-process layouts, which add no new
    split to a family, run SchNet and PaiNN only (CI time)."""
    extra = ["--node-parallel"] if nodes else []
    if nproc == 4 and (nodes or pipeline == 1):
        extra += ["--families", "schnet,painn"]
    out = torchrun(nproc, str(WORKER), "--tensor", str(tensor), "--pipeline", str(pipeline), *extra)
    assert "PARALLEL CHECKS PASSED" in out


@pytest.mark.parametrize(
    "family", ["painn", pytest.param("irrep", marks=pytest.mark.slow)], ids=str
)
def test_compiled_tensor_parallel_matches_single_process(family):
    """train.compile's traced graph (compiled without code generation) on each rank's
    channel slice: the mappings are ops whose derivatives are their conjugates, so the force
    loss's weight gradients match the single-device model. Conservative forces in two blocks;
    PaiNN in CI, IrrepNet (whose per-degree linears take [N, 2l+1, C] inputs, once traced
    with the atom count fixed) with -m slow (CI time); SchNet and EGNN pass too."""
    args = ["--tensor", "2", "--compile", "--families", family, "--forces", "conservative"]
    out = torchrun(2, str(WORKER), *args, "--layers", "2", timeout=900)
    assert "PARALLEL CHECKS PASSED" in out


def test_tensor_parallel_with_cuequivariance_matches_single_process():
    """model.tensor_product=cueq on each rank's channel slice (its products are built for
    the local channel count), conservative force loss included."""
    pytest.importorskip("cuequivariance_torch")
    args = ["--tensor", "2", "--families", "irrep-c2-cueq", "--forces", "conservative"]
    out = torchrun(2, str(WORKER), *args, "--layers", "2")
    assert "PARALLEL CHECKS PASSED" in out


def test_tensor_parallel_with_kernels_matches_single_process():
    """The Triton kernels (interpreted on CPU) on each rank's channel slice, conservative
    force loss included, against the single-device PyTorch model."""
    pytest.importorskip("triton")
    out = torchrun(2, str(WORKER), "--tensor", "2", "--backend", "triton")
    assert "PARALLEL CHECKS PASSED" in out


def test_calculator_evaluates_one_structure_across_tensor_parallel_ranks(tmp_path):
    """Inference of one periodic structure (71 atoms, two elements, edges in chunks) through
    the ASE calculator across two tensor-parallel ranks with node-parallel regions: energy,
    forces and stress equal the whole model's in one process, for every family."""
    worker = Path(__file__).with_name("calculator_worker.py")
    out = torchrun(2, str(worker), str(tmp_path / "models"), "painn", "schnet", "egnn", "irrep")
    assert out.count("tensor=2 matches") == 4
