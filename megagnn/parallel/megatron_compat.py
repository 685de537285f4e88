"""The one place that adapts megatron-core to this project: a lean import, and a CPU shim.

megatron-core's pipeline schedules, point-to-point layer, checkpoint writer, DDP and
optimizers ask CUDA for the current device, synchronise it, and create a few small tensors
with ``device="cuda"``. On a machine without CUDA (tests, CI: gloo) those calls are
redirected to the CPU, only inside those megatron modules; with CUDA present nothing is
changed. Its DistributedOptimizer also accepts only parameters whose ``Tensor.type()`` names
a CUDA type: ``cuda_type_names`` lets CPU parameters pass that check, so the exact code a
GPU run uses is tested on CPU.

Two costs every process would pay for parts of megatron-core that megagnn does not use are
avoided on every device (measured with megatron-core 0.16.1, torch 2.13 CPU, 2 cores):
- ``import megatron.core`` wraps its transformer fusions (bias-GeLU, SwiGLU, ...) in
  ``torch.compile`` at import time, which imports dynamo and inductor: 6.1 s instead of
  2.5 s. Those fusions are left uncompiled; megagnn's models never call them.
- its checkpoint writer hands its results back through a queue served by a *spawned*
  ``multiprocessing.Manager``, made on the first save of a process: a second interpreter
  that re-imports the main module (about 4 s). That queue exists for asynchronous saves,
  which outlive the call; megagnn saves synchronously (``dist_checkpointing.save`` writes
  and collects the results in the calling process), so an in-process queue carries them.
"""

from __future__ import annotations

import contextlib
import queue
import sys
import types
import warnings

import torch
from torch.overrides import TorchFunctionMode


def import_megatron():
    """``megatron.core``, without its warnings about the optional Transformer Engine/Apex
    and without compiling its transformer fusions (see the module docstring)."""
    if "megatron.core.pipeline_parallel.schedules" not in sys.modules:
        with warnings.catch_warnings(), _fusions_uncompiled():
            warnings.simplefilter("ignore")  # also torch.jit deprecations inside megatron
            import megatron.core
            import megatron.core.dist_checkpointing  # noqa: F401
            import megatron.core.models.backends  # noqa: F401  (imported lazily when saving)
            import megatron.core.parallel_state  # noqa: F401
            import megatron.core.pipeline_parallel.schedules  # noqa: F401
        _collect_save_results_in_process()
    return sys.modules["megatron.core"]


@contextlib.contextmanager
def _fusions_uncompiled():
    """``torch.compile`` as the identity while megatron-core binds its fuser
    (``megatron.core.jit.jit_fuser``) and decorates its fusions with it."""
    real = torch.compile

    def identity(model=None, **_options):
        return model if model is not None else (lambda fn: fn)

    torch.compile = identity
    try:
        yield
    finally:
        torch.compile = real


def _collect_save_results_in_process() -> None:
    import megatron.core.dist_checkpointing.strategies.filesystem_async as fs_async

    if fs_async._results_queue is None:  # megatron makes it lazily, on the first save
        fs_async._results_queue = queue.Queue()


class _NoStream:
    """A CUDA stream on a machine without one: there is nothing to wait for."""

    def wait_event(self, *_args) -> None:
        return None

    def wait_stream(self, *_args) -> None:
        return None

    def synchronize(self) -> None:
        return None


class _CudaOnCpu(types.SimpleNamespace):
    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> str:
        return "cpu"

    @staticmethod
    def synchronize(*_args) -> None:
        return None

    @staticmethod
    def current_stream(*_args) -> _NoStream:  # megatron-core 0.19's gradient buffers wait on it
        return _NoStream()


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
    import megatron.core.distributed.distributed_data_parallel as ddp
    import megatron.core.distributed.param_and_grad_buffer as buffers
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.optimizer.distrib_optimizer as distrib_optimizer
    import megatron.core.optimizer.optimizer as optimizer
    import megatron.core.utils as utils

    shim = _TorchOnCpu("torch")
    for module in (
        core.pipeline_parallel.p2p_communication,
        core.pipeline_parallel.schedules,
        fs_async,  # synchronises CUDA after copying tensors to host memory
        saver,  # creates its agreement flags on the current CUDA device
        ddp,  # gradient buffers on the current device
        buffers,
        distrib_optimizer,  # state and norms on the current device or "cuda"
        optimizer,
        clip_grads,
        utils,  # the multi-tensor l2 norm without apex/TE returns a "cuda" tensor
    ):
        module.torch = shim


class _CudaTypeNames(TorchFunctionMode):
    _NAMES = {
        "torch.FloatTensor": "torch.cuda.FloatTensor",
        "torch.HalfTensor": "torch.cuda.HalfTensor",
        "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    }

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return self._NAMES.get(result, result)
        return result


def cuda_type_names() -> contextlib.AbstractContextManager:
    """Inside it, a CPU tensor's ``type()`` names the CUDA type of its dtype (megatron's
    optimizers check those names); with CUDA present, nothing changes."""
    return contextlib.nullcontext() if torch.cuda.is_available() else _CudaTypeNames()
