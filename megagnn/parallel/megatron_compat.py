"""The one place that adapts megatron-core to this project: quiet import, and a CPU shim.

megatron-core's pipeline schedules and point-to-point layer ask CUDA for the current device,
synchronise it, and create one counter with ``device="cuda"``. On a machine without CUDA
(tests, CI: gloo) those calls are redirected to the CPU, and only inside those two
megatron modules; with CUDA present nothing is changed.
"""

from __future__ import annotations

import types
import warnings

import torch


def import_megatron():
    """``megatron.core``, without its warnings about the optional Transformer Engine/Apex."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import megatron.core
        import megatron.core.parallel_state  # noqa: F401
        import megatron.core.pipeline_parallel.schedules  # noqa: F401
    return megatron.core


class _CudaOnCpu(types.SimpleNamespace):
    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> str:
        return "cpu"

    @staticmethod
    def synchronize(*_args) -> None:
        return None


class _TorchOnCpu(types.ModuleType):
    """``torch`` as megatron's pipeline modules see it on a CPU-only machine."""

    cuda = _CudaOnCpu()

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, device=None, **kwargs):
        return torch.zeros(*args, device="cpu" if device == "cuda" else device, **kwargs)


def install_cpu_shim() -> None:
    """Let megatron-core's pipeline schedules run on CPU tensors; a no-op when CUDA exists."""
    if torch.cuda.is_available():
        return
    core = import_megatron()
    shim = _TorchOnCpu("torch")
    core.pipeline_parallel.p2p_communication.torch = shim
    core.pipeline_parallel.schedules.torch = shim
