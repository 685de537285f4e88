"""The one place that adapts megatron-core to this project: quiet import, and a CPU shim.

megatron-core's pipeline schedules, point-to-point layer and checkpoint writer ask CUDA for
the current device, synchronise it, and create a few small tensors with ``device="cuda"``.
On a machine without CUDA (tests, CI: gloo) those calls are redirected to the CPU, only
inside those megatron modules; with CUDA present nothing is changed.
"""

from __future__ import annotations

import types
import warnings

import torch


def import_megatron():
    """``megatron.core``, without its warnings about the optional Transformer Engine/Apex."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # also torch.jit deprecations inside megatron
        import megatron.core
        import megatron.core.dist_checkpointing  # noqa: F401
        import megatron.core.models.backends  # noqa: F401  (imported lazily when saving)
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
        return torch.zeros(*args, device=_cpu(device), **kwargs)

    @staticmethod
    def tensor(*args, device=None, **kwargs):
        return torch.tensor(*args, device=_cpu(device), **kwargs)


def _cpu(device):
    return "cpu" if device == "cuda" or isinstance(device, int) else device


def install_cpu_shim() -> None:
    """Let megatron-core's pipeline schedules run on CPU tensors; a no-op when CUDA exists."""
    if torch.cuda.is_available():
        return
    core = import_megatron()
    import megatron.core.dist_checkpointing.strategies.filesystem_async as fs_async
    import megatron.core.dist_checkpointing.strategies.state_dict_saver as saver

    shim = _TorchOnCpu("torch")
    for module in (
        core.pipeline_parallel.p2p_communication,
        core.pipeline_parallel.schedules,
        fs_async,  # synchronises CUDA after copying tensors to host memory
        saver,  # creates its agreement flags on the current CUDA device
    ):
        module.torch = shim
