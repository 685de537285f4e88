"""Device discipline on CPU: refuse, in any collective, a tensor a GPU run would keep on the host.

NCCL takes only tensors on the rank's GPU; gloo takes anything, so a CPU run cannot see a
collective handed a host tensor (``torch.tensor(step)`` without ``device=``): the first
multi-GPU run would be the first to fail. With ``MEGAGNN_CHECK_DEVICES=1`` in the
environment (the tests set it), every process that initialises parallelism follows where each
tensor would live on a GPU and every ``torch.distributed`` collective refuses a host one.

Placement follows CUDA's rules, on tensors made while the check is on:
- on the host: a tensor made without ``device=`` from no tensor (``torch.tensor(x)``,
  ``torch.zeros(n)``, ``torch.from_numpy``), ``.cpu()``, ``.pin_memory()``, and any result
  computed from host tensors alone;
- on the compute device: anything given ``device=``, ``.to(device)``, ``.cuda()``, and any
  result with at least one input there (CUDA lets a 0-dim host tensor join a GPU op).
An in-place op keeps its tensor's placement. What the check cannot see (tensors made by
autograd or in loader workers) counts as on the device, so it errs towards silence, never
towards a false alarm.
"""

from __future__ import annotations

import functools
import os
import sys
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

ENV = "MEGAGNN_CHECK_DEVICES"
_HOST = "_megagnn_host"  # attribute on a host tensor: where it was made ("file:line")
TENSOR_COLLECTIVES = (
    "all_reduce",
    "broadcast",
    "reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all",
    "all_to_all_single",
    "gather",
    "scatter",
    "send",
    "recv",
    "batch_isend_irecv",  # its P2POp tensors; isend/irecv stay unwrapped, as P2POp and
    # batch_isend_irecv test their op for identity with them
)
_UNSEEN_FACTORIES = ("from_numpy", "frombuffer")
_TO_HOST = {torch.Tensor.cpu, torch.Tensor.pin_memory}
_TO_DEVICE = {torch.Tensor.cuda}


class DeviceError(RuntimeError):
    """A collective was handed a tensor that a GPU run would hold in host memory."""


def _tensors(args) -> list[torch.Tensor]:
    """Tensors among ``args``, one level of lists and tuples deep (``torch.cat([a, b])``,
    ``P2POp`` lists)."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out += [x for x in a if isinstance(x, torch.Tensor)]
            out += [x.tensor for x in a if isinstance(x, dist.P2POp)]
        elif isinstance(a, dist.P2POp):
            out.append(a.tensor)
    return out


def host_origin(t: torch.Tensor) -> str | None:
    """Where a host tensor was made, or None for a tensor on the compute device."""
    return getattr(t, _HOST, None)


def _caller() -> str:
    """``file:line`` of the nearest frame outside torch and this module."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if f"{os.sep}torch{os.sep}" not in name and name != __file__:
            return f"{name}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


def _mark(result, host: str | None, inputs: list[torch.Tensor]) -> None:
    for t in result if isinstance(result, (list, tuple)) else (result,):
        if not isinstance(t, torch.Tensor) or any(t is x for x in inputs):
            continue  # an in-place op (or a no-op .to) keeps its tensor's placement
        if host is None:
            t.__dict__.pop(_HOST, None)
        else:
            setattr(t, _HOST, host)


def _to_device(func, args, kwargs) -> bool | None:
    """For ``Tensor.to``: True if it names a device, None if it only changes dtype/layout."""
    if kwargs.get("device") is not None:
        return True
    for a in args[1:]:
        if isinstance(a, (str, torch.device, int)):
            return True
        if isinstance(a, torch.Tensor):
            return host_origin(a) is None
    return None


class _Placement(TorchFunctionMode):
    """Marks every tensor a torch call returns with where a GPU run would have it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        inputs = _tensors(args) + _tensors(kwargs.values())
        if func is torch.Tensor.to:
            named = _to_device(func, args, kwargs)
            if named is not None:  # unlike the default rule, .to(device) may return self
                for t in result if isinstance(result, (list, tuple)) else (result,):
                    if isinstance(t, torch.Tensor):
                        t.__dict__.pop(_HOST, None) if named else setattr(t, _HOST, _caller())
                return result
        if func in _TO_HOST:
            host = _caller()
        elif func in _TO_DEVICE or kwargs.get("device") is not None:
            host = None
        elif inputs and any(host_origin(t) is None for t in inputs):
            host = None
        else:
            host = next((host_origin(t) for t in inputs), None) or _caller()
        _mark(result, host, inputs)
        return result


class _Checked:
    """A collective that first refuses host tensors."""

    def __init__(self, name: str, collective):
        self.name, self.collective = name, collective
        functools.update_wrapper(self, collective)

    def __call__(self, *args, **kwargs):
        for t in _tensors(args) + _tensors(kwargs.values()):
            origin = host_origin(t)
            if origin is not None:
                raise DeviceError(
                    f"torch.distributed.{self.name} got a {tuple(t.shape)} {t.dtype} tensor "
                    f"made in host memory at {origin}; NCCL refuses it on a GPU: create it "
                    "with device= the rank's compute device (ParallelState.device)"
                )
        return self.collective(*args, **kwargs)


def enabled() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


@contextmanager
def checking():
    """Within: placements are followed and every tensor collective is checked."""
    saved = {name: getattr(dist, name) for name in TENSOR_COLLECTIVES}
    for name, collective in saved.items():
        setattr(dist, name, _Checked(name, collective))
    # the function mode does not see these: mark their results here
    wrapped = {name: getattr(torch, name) for name in _UNSEEN_FACTORIES}
    for name, factory in wrapped.items():
        setattr(torch, name, _on_host(factory))
    try:
        with _Placement():
            yield
    finally:
        for name, collective in saved.items():
            setattr(dist, name, collective)
        for name, factory in wrapped.items():
            setattr(torch, name, factory)


def _on_host(factory):
    @functools.wraps(factory)
    def wrapper(*args, **kwargs):
        out = factory(*args, **kwargs)
        setattr(out, _HOST, _caller())
        return out

    return wrapper


_installed = []


def install() -> None:
    """``checking()`` for the rest of the process (idempotent)."""
    if not _installed:
        context = checking()
        context.__enter__()
        _installed.append(context)
