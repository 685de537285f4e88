"""megatron-core DDP + DistributedOptimizer on CUDA and NCCL, the default data-parallel path
there: it trains as the flat all-reduce + ZeRO-1 path does (losses and clipped gradient
norms), in one process and, with two GPUs, with two data-parallel ranks."""

import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).parents[1] / "distributed"))
from test_pretrain import MEGATRON, losses, pretrain  # noqa: E402


@pytest.mark.parametrize("nproc", [1, 2])
def test_megatron_data_parallel_matches_the_flat_path_on_cuda(emt_dataset, tmp_path, nproc):
    if torch.cuda.device_count() < nproc:
        pytest.skip(f"needs {nproc} GPUs")
    args = (*MEGATRON, "train.max_steps=4", "checkpoint.every=2")
    flat, megatron = tmp_path / "flat", tmp_path / "megatron"
    pretrain(nproc, flat, emt_dataset, *args, "parallel.data_parallel=flat")
    pretrain(nproc, megatron, emt_dataset, *args, "parallel.data_parallel=megatron")
    for key in ("loss/total", "grad_norm"):
        a, b = losses(flat, key), losses(megatron, key)
        assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4]
        for (step, x), (_, y) in zip(a, b, strict=True):
            # the kernels' atomics add in any order on a GPU
            assert y == pytest.approx(x, rel=1e-4), (key, step)
