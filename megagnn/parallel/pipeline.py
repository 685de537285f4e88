"""Pipeline parallelism: consecutive blocks per stage on megatron-core's 1F1B schedule.

Every stage reads the same batches from its own loader (same data-parallel rank, same
sampler), computes the edge geometry itself and receives only the node state from the
previous stage, packed as ``[N, 1, W]`` (megatron's [sequence, batch, hidden] layout, with
atoms as the sequence; N varies per microbatch, so shapes travel with the tensors).

Conservative forces are refused under pipeline parallelism at config time: F = -dE/dx needs
the position gradient of the last stage's energy back in every stage *inside* the forward
pass, which a 1F1B schedule does not provide. Direct forces and energy-only training work.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from functools import partial

import torch
from torch import nn

from megagnn import keys as K
from megagnn.models.potential import Potential
from megagnn.parallel.megatron_compat import import_megatron
from megagnn.parallel.state import ParallelState

Batch = dict[str, torch.Tensor]
LossFn = Callable[[Batch, dict], tuple[torch.Tensor, dict]]


def stage_layers(layers: int, stages: int, stage: int) -> range:
    """Blocks of ``stage``: as even a split as possible, earlier stages one block more."""
    if layers < stages:
        raise ValueError(f"{layers} blocks cannot fill {stages} pipeline stages")
    base, extra = divmod(layers, stages)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (stage < extra))


def global_name(name: str, first_layer: int) -> str:
    """A stage's parameter name in the unsharded model (stages number blocks from 0)."""
    prefix = "backbone.blocks."
    if first_layer and name.startswith(prefix):
        index, dot, rest = name[len(prefix) :].partition(".")
        name = f"{prefix}{int(index) + first_layer}{dot}{rest}"
    return name


def global_named_tensors(
    model: nn.Module,
) -> list[tuple[str, nn.Module, str, torch.Tensor, bool]]:
    """(name in the unsharded model, owning module, local name, tensor, is parameter) for
    every parameter and buffer of a Potential or of a stage's part of one."""
    first_layer = getattr(model, "first_layer", 0)
    root = getattr(model, "model", model)  # a pipeline stage wraps its part of the potential
    out = []
    for mname, module in root.named_modules():
        tensors = [(n, t, True) for n, t in module.named_parameters(recurse=False)]
        tensors += [(n, t, False) for n, t in module.named_buffers(recurse=False)]
        for name, tensor, is_param in tensors:
            full = global_name(f"{mname}.{name}" if mname else name, first_layer)
            out.append((full, module, name, tensor, is_param))
    return out


def schedule_config(par: ParallelState, dtype: torch.dtype):
    """The megatron-core config its schedules read (a TransformerConfig, but only the
    model-parallel fields matter here, so the transformer checks are skipped)."""
    core = import_megatron()
    from megatron.core.model_parallel_config import ModelParallelConfig

    @dataclasses.dataclass
    class StageConfig(core.transformer.TransformerConfig):
        def __post_init__(self) -> None:
            ModelParallelConfig.__post_init__(self)

    return StageConfig(
        num_layers=par.pp_size,
        hidden_size=1,  # shapes are exchanged per microbatch (variable_seq_lengths)
        num_attention_heads=1,
        tensor_model_parallel_size=par.tp_size,
        pipeline_model_parallel_size=par.pp_size,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        variable_seq_lengths=True,
        # batched p2p is wrong when the previous and next stage are the same rank
        batch_p2p_comm=False,
        use_cpu_initialization=True,
    )


class PipelineStage(nn.Module):
    """This rank's part of a Potential: [embedding] -> its blocks -> [energy/force heads].

    ``first_layer`` is the global index of its first block (checkpoints use global names).
    """

    def __init__(self, model: Potential, par: ParallelState, dtype: torch.dtype):
        super().__init__()
        layers = stage_layers(len(model.backbone.blocks), par.pp_size, par.pp_rank)
        self.first, self.last = par.is_first_stage, par.is_last_stage
        self.first_layer = layers.start
        model.backbone.blocks = nn.ModuleList(model.backbone.blocks[i] for i in layers)
        if not self.first:
            model.backbone.embedding = None
        if not self.last:
            model.energy_head = model.force_head = None
        self.model = model
        self.config = schedule_config(par, dtype)  # read by megatron's schedule
        self.model_type = import_megatron().enums.ModelType.encoder_or_decoder
        self.input_tensor: torch.Tensor | None = None

    def set_input_tensor(self, tensors: list[torch.Tensor | None]) -> None:
        self.input_tensor = tensors[0]

    def forward(self, batch: Batch):
        """Node state [N, 1, W] for the next stage, or predictions on the last stage."""
        model, backbone = self.model, self.model.backbone
        edges, raw = model.edges(batch, batch[K.POSITIONS], batch[K.CELL])
        if self.first:
            state = model.embed(batch[K.ATOMIC_NUMBERS])
        else:
            state = backbone.unpack(self.input_tensor.squeeze(1))
        state = model.run_blocks(backbone.blocks, state, edges)
        if not self.last:
            return backbone.pack(state).unsqueeze(1).to(self.config.pipeline_dtype)
        return model.heads(backbone.scalars(state), batch, raw)


def forward_backward(
    stage: PipelineStage,
    batches: list[Batch],
    loss_fn: LossFn,
    forward_only: bool = False,
    autocast: Callable = contextlib.nullcontext,
) -> list[dict]:
    """Run ``batches`` as microbatches through the pipeline (1F1B), backward included unless
    ``forward_only``. The loss is averaged over microbatches; gradients accumulate in the
    stage's parameters. Returns, on the last stage, ``loss_fn``'s second output per
    microbatch (an empty list elsewhere)."""
    core = import_megatron()

    def step(data: Iterator[Batch], model: PipelineStage):
        batch = next(data)
        with autocast():
            out = model(batch)
        return out, partial(loss_fn, batch)

    schedule = core.pipeline_parallel.schedules.forward_backward_pipelining_without_interleaving
    return schedule(
        forward_step_func=step,
        data_iterator=iter(batches),
        model=stage,
        num_microbatches=len(batches),
        seq_length=1,  # unused: shapes travel with each microbatch
        micro_batch_size=1,
        forward_only=forward_only,
    )
