"""Process groups from the torchrun environment, via megatron-core's parallel_state."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megagnn.config import ParallelConfig
from megagnn.parallel import device_check
from megagnn.parallel.mappings import Group
from megagnn.parallel.megatron_compat import import_megatron, install_cpu_shim


@dataclass
class ParallelState:
    """Where this process sits: its groups, ranks and device."""

    device: torch.device
    world_size: int = 1
    rank: int = 0
    tp_group: Group = None
    tp_size: int = 1
    tp_rank: int = 0
    dp_group: Group = None
    dp_size: int = 1
    dp_rank: int = 0
    pp_group: Group = None
    pp_size: int = 1
    pp_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def last_stage_rank(self) -> int:
        """Global rank of this pipeline's last stage (where losses and predictions live)."""
        if self.pp_group is None:
            return self.rank
        return dist.get_global_rank(self.pp_group, self.pp_size - 1)


def set_threads(requested: int | None = None) -> str:
    """Intra-op threads of this process: ``requested``, or the cores this process may use
    divided among the processes torchrun started on this machine (two processes with all
    cores each slow each other several times over). Returns what was chosen, to print."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = requested or max(1, (cores or 1) // local)
    torch.set_num_threads(threads)
    how = "train.threads" if requested else f"{cores} cores / {local} local processes"
    return f"threads: {threads} per process ({how})"


def default_device() -> torch.device:
    """The device of a process run without torchrun: the GPU where there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _device() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def init_parallel(cfg: ParallelConfig) -> ParallelState:
    """Initialise torch.distributed (nccl on GPU, gloo on CPU) and the TP/PP/DP groups.

    A single process without torchrun needs no process group at all. With
    ``MEGAGNN_CHECK_DEVICES=1`` every collective refuses host tensors from then on
    (``megagnn.parallel.device_check``).
    """
    if device_check.enabled():
        device_check.install()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dp_size = cfg.data_parallel_size(world)
    device = _device()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if world == 1:
        if cfg.data_parallel != "megatron":
            return ParallelState(device=device)
        # megatron-core's DDP asked for by name: it needs its process groups, of one rank
        if not dist.is_initialized():
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    if not dist.is_initialized():
        dist.init_process_group(backend)
    ps = import_megatron().parallel_state
    if cfg.pipeline > 1:
        install_cpu_shim()
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=cfg.tensor, pipeline_model_parallel_size=cfg.pipeline
        )
    return ParallelState(
        device=device,
        world_size=world,
        rank=dist.get_rank(),
        tp_group=ps.get_tensor_model_parallel_group() if cfg.tensor > 1 else None,
        tp_size=cfg.tensor,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        dp_group=ps.get_data_parallel_group() if dp_size > 1 else None,
        dp_size=dp_size,
        dp_rank=ps.get_data_parallel_rank(),
        pp_group=ps.get_pipeline_model_parallel_group() if cfg.pipeline > 1 else None,
        pp_size=cfg.pipeline,
        pp_rank=ps.get_pipeline_model_parallel_rank(),
    )


def destroy_parallel() -> None:
    if dist.is_initialized():
        import_megatron().parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
