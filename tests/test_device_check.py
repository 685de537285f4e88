"""The device-discipline check: collectives refuse tensors a GPU run would keep on the host."""

import pytest
import torch
import torch.distributed as dist

from megagnn.checkpoint.sharded import _optimizer_common
from megagnn.parallel import device_check
from megagnn.parallel.data import FlatDataParallel
from megagnn.parallel.device_check import DeviceError


@pytest.fixture
def checked():
    if not dist.is_initialized():  # a one-rank gloo group, as single-process checkpoints use
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    with device_check.checking():
        yield


def test_host_tensors_are_refused_with_where_they_were_made(checked):
    with pytest.raises(DeviceError, match=r"all_reduce got a \(2,\).*test_device_check.py:\d+"):
        dist.all_reduce(torch.tensor([1.0, 2.0]))
    host = torch.zeros(3)
    for derived in (host * 2, host[1:], torch.stack([host, host]), torch.randn(3).cpu()):
        with pytest.raises(DeviceError):
            dist.all_reduce(derived)
    with pytest.raises(DeviceError):
        dist.all_gather([torch.zeros(3, device="cpu")], host)
    with pytest.raises(DeviceError):
        dist.broadcast(torch.from_numpy(host.numpy().copy()), src=0)


def test_device_tensors_pass(checked):
    on_device = torch.ones(3, device="cpu")
    param = torch.nn.Parameter(torch.ones(2, device="cpu"))
    host = torch.zeros(3)
    for t in (
        on_device,
        on_device * torch.tensor(2.0),  # a 0-dim host tensor joins a GPU op
        host.to("cpu"),
        torch.zeros_like(on_device),
        on_device.new_zeros(4),
        torch.cat([on_device, host.to(on_device)]),
        (param * 3).sum().reshape(1),
        torch.autograd.grad((param**2).sum(), param)[0],
    ):
        dist.all_reduce(t)
    in_place = torch.zeros(3)  # an in-place op does not move its tensor
    in_place.add_(on_device)
    with pytest.raises(DeviceError):
        dist.all_reduce(in_place)


def test_checkpoint_optimizer_state_is_reduced_on_the_device(checked):
    """AdamW keeps its step count on the host; the checkpoint's max over ranks must not."""
    param = torch.nn.Parameter(torch.ones(3, device="cpu"))
    optimizer = FlatDataParallel(torch.nn.ParameterList([param]), [param], 1e-3, 0.0)
    param.grad = torch.ones(3, device="cpu")
    optimizer.step()
    assert _optimizer_common(optimizer, torch.device("cpu"))["step"] == 1.0
