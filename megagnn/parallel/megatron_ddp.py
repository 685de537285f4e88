"""Data parallelism with megatron-core: its DDP and its DistributedOptimizer.

- DDP keeps every gradient in contiguous buckets (fp32) and reduce-scatters a bucket over the
  data-parallel ranks as soon as the backward pass has filled it, so communication overlaps
  the rest of the backward. With gradient accumulation only the last microbatch reduces.
- DistributedOptimizer holds the AdamW moments of one contiguous 1/dp slice of each bucket
  (ZeRO-1 on ranges, not whole parameters), updates that slice and all-gathers the new
  parameters.

Conservative forces make the loss backward a second derivative. DDP's hooks sit on each
parameter's gradient accumulator, which the force pass (``autograd.grad`` with respect to
positions) never runs: only the loss backward fires them, once per parameter per
microbatch, so bucketing and overlap hold unchanged (tested against one process).

The checkpoint gets every parameter's moments whole, gathered from the ranks' flat shards
(``moments``) and saved under the same global keys as every other layout, so a run resumes
and reshards across this path and the flat one.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
from torch import nn

from megagnn.parallel.data import MOMENTS, LocalState, zero_moments
from megagnn.parallel.layers import is_sharded
from megagnn.parallel.megatron_compat import cuda_type_names, import_megatron, install_cpu_shim


def _mark_tensor_parallel(model: nn.Module) -> None:
    """Tell megatron which parameters are tensor-parallel slices: replicated ones count once
    in the gradient norm (on tensor-parallel rank 0)."""
    from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if is_sharded(module, name):
                dim = module.partition_dim if p.dim() > 1 else 0
                set_tensor_model_parallel_attributes(p, True, dim, 1)


class MegatronDataParallel(LocalState):
    """megatron-core DDP + DistributedOptimizer over ``model`` (this rank's part), stepping
    AdamW over ``param_groups`` (each with its own learning rate)."""

    def __init__(
        self,
        model: nn.Module,
        param_groups: list,
        lr: float,
        weight_decay: float,
        schedule_config,
        overlap_grad_reduce: bool = True,
        bucket_size: int | None = None,
    ):
        core = import_megatron()
        if not core.parallel_state.model_parallel_is_initialized():
            raise RuntimeError(
                "parallel.data_parallel=megatron needs megatron-core's process groups: "
                "start the run with megagnn.pretrain (or parallel.state.init_parallel)"
            )
        install_cpu_shim()  # CPU-only machines (tests); nothing with CUDA
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
        )
        from megatron.core.optimizer import OptimizerConfig
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

        _mark_tensor_parallel(model)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=overlap_grad_reduce,
            use_distributed_optimizer=True,
            bucket_size=bucket_size,
        )
        adamw = torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay)
        config = OptimizerConfig(
            optimizer="adam",
            lr=lr,
            weight_decay=weight_decay,
            use_distributed_optimizer=True,
            clip_grad=0.0,  # clipped here, after the non-finite check (``clip``)
        )
        with cuda_type_names():
            self.ddp = DistributedDataParallel(schedule_config, ddp_config, model)
            self.megatron = DistributedOptimizer(
                adamw,
                config,
                None,  # no loss scaling: fp32 weights, bf16 only under autocast
                zero_moments,
                model_chunks=[self.ddp],
                per_model_buffers={0: self.ddp.buffers},
                data_parallel_group=core.parallel_state.get_data_parallel_group(),
                # both only for megatron's own checkpoint formats (megagnn saves ``moments``)
                data_parallel_group_gloo=None,
                data_parallel_group_idx=0,
                distributed_optimizer_instance_id=0,
            )
        # the gradient norm sums over every rank (no grad_stats_parallel_group: the world):
        # gradient shards, tensor slices and pipeline stages are disjoint
        self.optimizer = adamw  # its param_groups are the ones the scheduler steers
        self.local = adamw  # its state: this rank's shards
        self.moments_sharded = False  # moments() gathers them whole on every rank
        self._poisoned = False

    # -- a step ----------------------------------------------------------------------------
    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def zero_grad(self) -> None:
        self.ddp.zero_grad_buffer()
        self.megatron.zero_grad()

    def no_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Around a microbatch's backward: only the last one reduces gradients."""
        return contextlib.nullcontext() if last else self.ddp.no_sync()

    def poison(self) -> None:
        """Make the global gradient norm non-finite (this rank's loss was). Buckets may be
        reduced already, so the rank's own gradient shard is poisoned when the norm is
        taken: the norm sums over every rank."""
        self._poisoned = True

    def reduce(self) -> None:
        self.ddp.finish_grad_sync()

    def clip(self, max_norm: float) -> torch.Tensor:
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        self.megatron.prepare_grads()  # main-gradient shards -> the AdamW shards' grads
        if self._poisoned:
            for p in self.megatron.get_parameters():
                p.grad.fill_(math.nan)
            self._poisoned = False
        norm = self.megatron.get_grad_norm()
        if math.isfinite(max_norm) and math.isfinite(norm):
            with cuda_type_names():
                clip_grad_by_total_norm_fp32(self.megatron.get_parameters(), max_norm, norm)
        return torch.tensor(norm, dtype=torch.float64)

    def step(self) -> None:
        with cuda_type_names():
            self.megatron.step_with_ready_grads()  # AdamW on the shards, then all-gather

    # -- what the checkpoint reads ---------------------------------------------------------
    def moments(self, loading: bool = False) -> dict[torch.Tensor, dict[str, torch.Tensor]]:
        """Every parameter's whole moments, on every data-parallel rank (megatron's "fully
        reshardable" layout): gathered from the ranks' flat shards bucket by bucket (a
        collective; the whole state is held for the save's duration), or with ``loading``
        zeros to load into, handed back with ``loaded``."""
        out = {}
        for buffer in self.ddp.buffers:
            for bucket in buffer.buckets:
                if loading:
                    out.update(
                        {p: {m: torch.zeros_like(p) for m in MOMENTS} for p in bucket.params}
                    )
                else:
                    out.update(self._gather(buffer, bucket))
        return out

    def _gather(self, buffer, bucket) -> dict[torch.Tensor, dict[str, torch.Tensor]]:
        group = self.megatron.data_parallel_group
        size = bucket.grad_data.numel() // group.size()  # each rank's contiguous share
        local = {m: bucket.grad_data.new_zeros(size) for m in MOMENTS}
        for p in bucket.params:
            if p in self.megatron.model_param_group_index_map:  # this rank holds part of it
                span = self.megatron._get_model_param_range_map(p)["gbuf_local"]
                state = self.megatron._get_main_param_and_optimizer_states(p)
                for m in MOMENTS:
                    if m in state:  # none before the first step: zeros
                        local[m][span.start : span.end] = state[m]
        out = {p: {} for p in bucket.params}
        for m in MOMENTS:
            world = local[m].new_empty(size * group.size())
            dist.all_gather_into_tensor(world, local[m], group=group)
            for p in bucket.params:
                start, end, _ = buffer.param_index_map[p]
                out[p][m] = world[start - bucket.offset : end - bucket.offset].view_as(p)
        return out

    def loaded(self, moments: dict[torch.Tensor, dict[str, torch.Tensor]]) -> None:
        """Keep this rank's ranges of whole ``moments`` that a checkpoint filled."""
        zero_moments(self.optimizer)
        for p in self.megatron.model_param_group_index_map:
            span = self.megatron._get_model_param_range_map(p)["param"]
            state = self.megatron._get_main_param_and_optimizer_states(p)
            for m in MOMENTS:
                state[m].copy_(moments[p][m].reshape(-1)[span.start : span.end])
