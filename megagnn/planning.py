"""Memory per rank of a training layout, predicted before anything is allocated.

A rank holds its weights, their gradients, its part of the AdamW moments, the weight
average (optim.ema_decay) and one step's activations. The first four are counted exactly:
the model is built on the meta device and cut by the tensor-parallel plan under a fake
process group of the layout's size (no memory, no other process), and its pipeline stages
take their blocks as ``parallel.pipeline.stage_layers`` assigns them. Megatron's
accounting applies (arXiv 1910.02054): with fp32 weights, 4 bytes each for weights and
gradients and 8 for the moments, the moments divided over the data-parallel ranks when the
optimizer is sharded (parallel.shard_optimizer).

Activations depend on the batch (atoms N, edges E) and on what autograd keeps for the
conservative-force loss's double backward, so they are measured, not derived: small models
of the same family and config (hidden width h and 2h, one and two blocks, two densities,
tensor size 1 and 2, with and without recompute) run one training step on real tensors while
the bytes autograd saves are counted (``profiling.count_saved_activations``); the least-
squares fit of those counts to

    per block: N·H/tp, N·H, E·H/tp, E·H, E, N   and once: N·H, E·H, E, N

extrapolates to any width, depth, batch and tensor size. FLOPs per step are counted
exactly: the rank's model and the batch on the meta device, one training step under torch's
FlopCounterMode, for a throughput estimate.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist

from megagnn import keys as K
from megagnn.config import LossConfig, ModelConfig
from megagnn.models import build_model
from megagnn.parallel.pipeline import stage_layers

BLOCK_FEATURES = ("N*H/tp", "N*H", "E*H/tp", "E*H", "E", "N")
OUTER_FEATURES = ("N*H", "E*H", "E", "N")
WEIGHT_BYTES = {"fp32": 4, "bf16": 4, "fp64": 8}  # bf16 autocasts fp32 weights
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a run spreads over ranks: tensor x pipeline x data parallel."""

    tensor: int = 1
    pipeline: int = 1
    data: int = 1
    recompute: bool = False
    shard_optimizer: bool = True

    @property
    def ranks(self) -> int:
        return self.tensor * self.pipeline * self.data

    def __str__(self) -> str:
        text = f"TP{self.tensor} x PP{self.pipeline} x DP{self.data}"
        return text + (" + recompute" if self.recompute else "")


@contextlib.contextmanager
def fake_group(size: int) -> Iterator[dist.ProcessGroup | None]:
    """A process group of ``size`` ranks that exists only in this process (torch's fake
    backend: collectives return at once), for cutting models as rank 0 of a layout."""
    if size == 1:
        yield None
        return
    if dist.is_initialized():
        raise RuntimeError("the planner builds its own fake process group: run it alone")
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", rank=0, world_size=size, store=FakeStore())
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def _cut(model, group, tensor: int):
    from megagnn.parallel.tensor import parallelize_tensor

    return parallelize_tensor(model, group) if tensor > 1 else model


def stage_parameters(cfg: ModelConfig, tensor: int, pipeline: int) -> list[int]:
    """Parameters one tensor-parallel rank of each pipeline stage holds (exact): its blocks,
    the embedding on the first stage, everything else (readout, heads) on the last."""
    with fake_group(tensor) as group:
        model = _cut(build_model(cfg, device="meta"), group, tensor)
    blocks = [sum(p.numel() for p in b.parameters()) for b in model.backbone.blocks]
    in_blocks = sum(blocks)
    embedding = sum(p.numel() for p in model.backbone.embedding.parameters())
    rest = sum(p.numel() for p in model.parameters()) - in_blocks - embedding
    out = []
    for stage in range(pipeline):
        count = sum(blocks[i] for i in stage_layers(cfg.layers, pipeline, stage))
        count += embedding if stage == 0 else 0
        count += rest if stage == pipeline - 1 else 0
        out.append(count)
    return out


def state_bytes(params: int, layout: Layout, precision: str, ema: bool) -> dict[str, float]:
    """Weights, gradients, AdamW moments (sharded over data-parallel ranks) and the weight
    average of ``params`` parameters, in bytes."""
    w = WEIGHT_BYTES[precision]
    shards = layout.data if layout.shard_optimizer else 1
    return {
        "weights": params * w,
        "gradients": params * w,
        "optimizer": 2 * params * w / shards,
        "average": params * w if ema else 0.0,
    }


def cell_batch(n_atoms: int, cutoff: float, spacing: float = 1.0) -> dict[str, torch.Tensor]:
    """A rattled fcc CuAu cell of about ``n_atoms`` atoms with labels; ``spacing`` scales
    the lattice (fewer neighbours per atom when > 1)."""
    from megagnn.profiling import fixed_batch

    batch = fixed_batch(n_atoms, cutoff)
    batch[K.POSITIONS] = batch[K.POSITIONS] * spacing
    batch[K.CELL] = batch[K.CELL] * spacing
    return batch


def measure_step(
    cfg: ModelConfig,
    batch: dict[str, torch.Tensor],
    tensor: int = 1,
    recompute: bool = False,
    precision: str = "fp32",
) -> dict[str, int]:
    """One training step of ``cfg`` as rank 0 of a tensor-parallel group of ``tensor``
    (real tensors, fake collectives) with AdamW: activation bytes autograd saved at the peak,
    the bytes of weights, gradients and optimizer state after the step, FLOPs, parameters,
    atoms and edges."""
    from torch.utils.flop_counter import FlopCounterMode

    from megagnn.data.graph import to_device
    from megagnn.precision import DTYPES
    from megagnn.profiling import count_saved_activations
    from megagnn.training.loss import loss_terms

    dtype = DTYPES[precision]
    with fake_group(tensor) as group:
        torch.manual_seed(0)
        model = _cut(build_model(cfg), group, tensor).to(dtype).train()
        model.set_statistics(0, {29: -3.5, 79: -2.0}, 1.0, 40.0)
        model.recompute_activations = recompute
        batch = to_device(batch, torch.device("cpu"), dtype)
        autocast = torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16")
        flops = FlopCounterMode(display=False)
        with count_saved_activations(model) as saved, flops:
            with autocast:
                pred = model(batch)
            loss_terms(pred, batch, model.scale, LossConfig())["total"].backward()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        optimizer.step()

    def nbytes(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))

    moments = [t for state in optimizer.state.values() for k, t in state.items() if k != "step"]
    return {
        "activation_bytes": saved["bytes"],
        "weight_bytes": nbytes(model.parameters()),
        "gradient_bytes": nbytes(p.grad for p in model.parameters()),
        "optimizer_bytes": nbytes(moments),
        "flops": flops.get_total_flops(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "atoms": int(batch[K.N_ATOMS].sum()),
        "edges": int(batch[K.EDGE_INDEX].shape[1]),
    }


def features(layers: int, hidden: int, atoms: int, edges: int, tensor: int) -> np.ndarray:
    n, e, h, tp = float(atoms), float(edges), float(hidden), float(tensor)
    block = [n * h / tp, n * h, e * h / tp, e * h, e, n]
    return np.array([layers * x for x in block] + [n * h, e * h, e, n])


def step_flops(
    cfg: ModelConfig, batch: dict[str, torch.Tensor], tensor: int = 1, recompute: bool = False
) -> int:
    """FLOPs of one training step (forward, forces, loss backward; the recomputed forward
    too with ``recompute``) of one tensor-parallel rank of ``cfg`` on ``batch``: counted on
    the meta device, so any size costs nothing."""
    import torch.fx.experimental._config as fx_config
    from torch.utils.flop_counter import FlopCounterMode

    from megagnn.data.graph import to_device
    from megagnn.training.loss import loss_terms

    meta = torch.device("meta")
    batch = to_device(batch, meta, torch.float32)
    counter = FlopCounterMode(display=False)
    # boolean masks of labels: every label present (the count is data-independent)
    with fake_group(tensor) as group, fx_config.patch(meta_nonzero_assume_all_nonzero=True):
        model = _cut(build_model(cfg, device="meta"), group, tensor).train()
        model.recompute_activations = recompute
        with counter:
            pred = model(batch)
            loss_terms(pred, batch, model.scale, LossConfig())["total"].backward()
    return counter.get_total_flops()


@dataclasses.dataclass
class ActivationModel:
    """Fitted activation bytes per feature for one model config, recompute on and off."""

    cfg: ModelConfig
    precision: str
    coefficients: dict[bool, np.ndarray]
    residual: float  # worst relative error of the fit on its own measurements

    @classmethod
    def calibrate(cls, cfg: ModelConfig, precision: str = "fp32") -> ActivationModel:
        """Measure small models of ``cfg``'s family and config and fit the coefficients."""
        from scipy.optimize import nnls

        base = max(8, 2 * (cfg.lmax + 1) if cfg.family == "irrep" else 8)
        rows, worst = {False: ([], []), True: ([], [])}, 0.0
        cells = [cell_batch(64, cfg.cutoff, 1.0), cell_batch(64, cfg.cutoff, 1.3)]
        for hidden, layers, batch, tensor, recompute in itertools.product(
            (base, 2 * base), (1, 2), cells, (1, 2), (False, True)
        ):
            small = dataclasses.replace(cfg, hidden=hidden, layers=layers)
            m = measure_step(small, batch, tensor, recompute, precision)
            x = features(layers, hidden, m["atoms"], m["edges"], tensor)
            rows[recompute][0].append(x)
            rows[recompute][1].append(m["activation_bytes"])
        coefficients = {}
        for recompute, (x, y) in rows.items():
            x, y = np.array(x), np.array(y, float)
            scale = x.max(axis=0) + 1e-30  # columns of similar size for the solver
            c, _ = nnls(x / scale, y)
            coefficients[recompute] = c / scale
            worst = max(worst, float(np.max(np.abs(x @ coefficients[recompute] - y) / y)))
        return cls(cfg, precision, coefficients, worst)

    def activation_bytes(
        self, hidden: int, layers: int, atoms: int, edges: int, tensor: int, recompute: bool
    ) -> float:
        """Predicted peak bytes autograd keeps in one training step."""
        x = features(layers, hidden, atoms, edges, tensor)
        return float(x @ self.coefficients[recompute])


def plan(
    cfg: ModelConfig,
    layout: Layout,
    batch: dict[str, torch.Tensor],
    activations: ActivationModel,
    precision: str = "fp32",
    ema: bool = False,
    microbatches: int = 1,
) -> dict:
    """Predicted bytes on the busiest rank of ``layout`` for ``batch`` on each data-parallel
    rank (per microbatch), by kind, and FLOPs per step per rank."""
    atoms, edges = int(batch[K.N_ATOMS].sum()), int(batch[K.EDGE_INDEX].shape[1])
    per_stage = stage_parameters(cfg, layout.tensor, layout.pipeline)
    stage = int(np.argmax(per_stage))
    params = per_stage[stage]
    layers = len(stage_layers(cfg.layers, layout.pipeline, stage))
    state = state_bytes(params, layout, precision, ema)
    # 1F1B keeps up to `pipeline` microbatches in flight on the first stage
    in_flight = min(microbatches, layout.pipeline) if layout.pipeline > 1 else 1
    act = in_flight * activations.activation_bytes(
        cfg.hidden, layers, atoms, edges, layout.tensor, layout.recompute
    )
    total = sum(state.values()) + act
    staged = dataclasses.replace(cfg, layers=layers)
    flops = microbatches * step_flops(staged, batch, layout.tensor, layout.recompute)
    return {
        "layout": str(layout),
        "atoms": atoms,
        "edges": edges,
        "parameters_per_rank": params,
        **{f"{k}_bytes": v for k, v in state.items()},
        "state_bytes_per_parameter": sum(state.values()) / params,
        "activation_bytes": act,
        "total_bytes": total,
        "flops_per_step": flops,
    }


def layouts(cfg: ModelConfig, gpus: int, recompute: bool) -> list[Layout]:
    """Every tensor x pipeline x data split of ``gpus`` that ``cfg`` can run: powers of two
    for TP and PP, TP dividing the width, PP at most the depth, and no pipeline for
    conservative forces (refused at config time: the position gradient would have to cross
    the stages inside the forward pass)."""
    out = []
    stages = (1,) if cfg.forces == "conservative" else (1, 2, 4, 8, 16)
    for tp in (1, 2, 4, 8):
        for pp in stages:
            if gpus % (tp * pp) or cfg.hidden % tp or pp > cfg.layers:
                continue
            for rc in (False, True) if recompute else (False,):
                out.append(Layout(tp, pp, gpus // (tp * pp), recompute=rc))
    return out


def estimated_atoms_per_s(row: dict, atoms: int, layout: Layout, peak_flops: float, mfu: float):
    """Atoms per second of the whole run if each rank sustains ``mfu`` of ``peak_flops``
    (pipeline bubbles and communication are not modelled)."""
    seconds = row["flops_per_step"] / (peak_flops * mfu)
    return layout.data * atoms / seconds if seconds > 0 else math.inf


def copy_config(cfg: ModelConfig, **changes) -> ModelConfig:
    return dataclasses.replace(copy.deepcopy(cfg), **changes)
