"""Measure one training step: time, FLOPs, activation and parameter memory, communication.

Used by ``tools/profile_throughput.py``. Everything is measured on the production path (the
Trainer's own ``train_step``) on a fixed batch, so the numbers describe what training does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import resource
import statistics
import tempfile
import time
from collections.abc import Iterator

import ase.io
import numpy as np
import torch
import torch.distributed as dist
from ase.build import bulk
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from megagnn import keys as K
from megagnn.config import Config, ModelConfig
from megagnn.data import atoms_to_graph, collate
from megagnn.data.emt import generate
from megagnn.data.preprocess import preprocess
from megagnn.parallel.state import ParallelState
from megagnn.training.trainer import Trainer

# collectives whose first argument is the tensor moved (bytes counted as sent by this rank)
_COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_single",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_single",
    "reduce_scatter_tensor",
    "all_to_all",
    "broadcast",
    "isend",
    "send",
)


def _payload(name: str, first, args: tuple) -> int:
    """Bytes this rank contributes to a collective call: the tensor(s) it sends."""
    if name in ("all_reduce", "broadcast", "isend", "send"):
        sent = first
    else:  # (output, input) or (output list, input [list]) signatures
        sent = args[0] if args else None
    sent = sent if isinstance(sent, (list, tuple)) else [sent]
    return sum(t.numel() * t.element_size() for t in sent if isinstance(t, torch.Tensor))


def fixed_batch(n_atoms: int, cutoff: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """One periodic fcc CuAu structure of about ``n_atoms`` atoms, rattled, random labels."""
    reps = max(1, round((n_atoms / 4) ** (1 / 3)))
    atoms = bulk("Cu", "fcc", a=3.7, cubic=True) * (reps, reps, reps)
    rng = np.random.default_rng(seed)
    atoms.numbers[rng.random(len(atoms)) < 0.3] = 79
    atoms.rattle(0.05, seed=seed)
    graph = atoms_to_graph(atoms, cutoff)
    graph[K.ENERGY] = torch.tensor([-3.5 * len(atoms)])
    graph[K.FORCES] = torch.from_numpy(rng.normal(0, 0.3, (len(atoms), 3)))
    graph[K.STRESS] = torch.zeros(1, 3, 3)
    graph[K.HAS_ENERGY] = torch.ones(1, dtype=torch.bool)
    graph[K.HAS_FORCES] = torch.ones(1, dtype=torch.bool)
    graph[K.HAS_STRESS] = torch.ones(1, dtype=torch.bool)
    return collate([graph])


def statistics_dataset(directory: str) -> str:
    """A tiny EMT dataset: the Trainer takes its reference energies and scale from it."""
    raw = f"{directory}/emt.extxyz"
    ase.io.write(raw, list(generate(12, seed=0, progress=False)))
    preprocess([raw], f"{directory}/emt", progress=False)
    return f"{directory}/emt"


@dataclasses.dataclass
class Communication:
    """What this rank hands to torch.distributed: bytes and calls, by call name."""

    bytes: dict[str, int] = dataclasses.field(default_factory=dict)
    calls: dict[str, int] = dataclasses.field(default_factory=dict)


@contextlib.contextmanager
def count_communication() -> Iterator[Communication]:
    """Bytes this rank hands to torch.distributed collectives and sends, and the calls."""
    comm = Communication()
    originals = {name: getattr(dist, name) for name in _COLLECTIVES if hasattr(dist, name)}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            # torch's ZeroRedundancyOptimizer passes the tensor by keyword (tensor=...)
            values = [*args, *kwargs.values()]
            first, rest = (values[0], tuple(values[1:])) if values else (None, ())
            comm.bytes[name] = comm.bytes.get(name, 0) + _payload(name, first, rest)
            comm.calls[name] = comm.calls.get(name, 0) + 1
            return fn(*args, **kwargs)

        return wrapper

    # P2POp checks its op against distributed_c10d's own names: patch both bindings
    modules = (dist, dist.distributed_c10d)
    for name, fn in originals.items():
        wrapped = counting(name, fn)
        for module in modules:
            setattr(module, name, wrapped)
    try:
        yield comm
    finally:
        for name, fn in originals.items():
            for module in modules:
                setattr(module, name, fn)


class _Saved:
    """Handle autograd keeps instead of a saved tensor; releases its bytes when dropped."""

    def __init__(self, tensor: torch.Tensor, tracker: _LiveBytes):
        self.tensor, self.tracker = tensor, tracker
        self.key = tracker.add(tensor)

    def __del__(self):
        self.tracker.release(self.key)


class _LiveBytes:
    """Bytes of distinct storages saved for backward that are still alive, and their peak."""

    def __init__(self, exclude: set[int]):
        self.exclude, self.refs, self.live, self.peak = exclude, {}, 0, 0

    def add(self, t: torch.Tensor) -> int | None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self.exclude or t.device.type == "meta":
            return None
        count, nbytes = self.refs.get(key, (0, storage.nbytes()))
        if count == 0:
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        self.refs[key] = (count + 1, nbytes)
        return key

    def release(self, key: int | None) -> None:
        if key is None or key not in self.refs:
            return
        count, nbytes = self.refs[key]
        if count == 1:
            del self.refs[key]
            self.live -= nbytes
        else:
            self.refs[key] = (count - 1, nbytes)


@contextlib.contextmanager
def count_saved_activations(model: torch.nn.Module) -> Iterator[dict[str, int]]:
    """Peak bytes of the tensors autograd keeps for backward (activations; weights excluded;
    each storage once): the activation memory of a step on any device, microbatches in
    flight included."""
    tracker = _LiveBytes({p.untyped_storage().data_ptr() for p in model.parameters()})
    out = {"bytes": 0}
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: _Saved(t, tracker), lambda saved: saved.tensor
    ):
        yield out
    out["bytes"] = tracker.peak


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_host_memory() -> int:
    """Peak resident memory of this process in bytes (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def top_operators(step, device: torch.device, top: int) -> list[dict]:
    """The ``top`` operators by self time in one call of ``step`` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        step()
        _sync(device)
    cuda = device.type == "cuda"
    events = sorted(
        prof.key_averages(),
        key=lambda e: e.self_device_time_total if cuda else e.self_cpu_time_total,
        reverse=True,
    )
    return [
        {
            "name": e.key,
            "calls": e.count,
            "self_ms": (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3,
        }
        for e in events[:top]
    ]


def collectives_per_block(trainer: Trainer, micro: list, full: Communication) -> dict | None:
    """Collective calls one block adds to a training step (forward, backward and the force
    loss's double backward), by name: the step's count minus that of the same step with the
    last block left out. None under pipeline parallelism (stages own the blocks)."""
    if trainer.pipeline is not None:
        return None
    backbone = trainer.potential.backbone
    blocks = backbone.blocks
    if len(blocks) < 2:
        return None
    backbone.blocks = blocks[:-1]
    try:
        with count_communication() as fewer:
            trainer.train_step(micro)
    finally:
        backbone.blocks = blocks
    return {
        k: n - fewer.calls.get(k, 0) for k, n in full.calls.items() if n > fewer.calls.get(k, 0)
    }


def profile_step(cfg: Config, par: ParallelState, n_atoms: int, steps: int, top: int = 0) -> dict:
    """Time ``steps`` training steps (after one warm-up) on a fixed batch; measure the rest
    on one extra step (and the ``top`` operators by self time on another). Returns this
    rank's numbers."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg.data.path = statistics_dataset(tmp)
        cfg.train.out_dir = f"{tmp}/run"
        cfg.checkpoint.resume = False
        trainer = Trainer(cfg, par)
    batch = fixed_batch(n_atoms, cfg.model.cutoff)
    micro = [batch] * cfg.train.microbatches
    device = trainer.device
    trainer.train_step(micro)  # warm-up: allocations, lazy inits
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        trainer.train_step(micro)
        _sync(device)
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    flops = FlopCounterMode(display=False)
    with count_communication() as comm, count_saved_activations(trainer.model) as act, flops:
        trainer.train_step(micro)
    per_block = collectives_per_block(trainer, micro, comm)
    params = list(trainer.model.parameters())
    step_time = statistics.median(times)
    n_edges = int(batch[K.EDGE_INDEX].shape[1])
    result = {
        "rank": par.rank,
        "layout": {"tensor": par.tp_size, "pipeline": par.pp_size, "data": par.dp_size},
        "atoms": int(batch[K.N_ATOMS].sum()) * len(micro),
        "edges": n_edges * len(micro),
        "step_time_s": step_time,
        "step_times_s": times,
        "parameters": sum(p.numel() for p in params),
        "parameter_bytes": sum(p.numel() * p.element_size() for p in params),
        "activation_bytes": act["bytes"],
        "optimizer_state_bytes": trainer.optimizer.state_bytes(),
        "communication_bytes": comm.bytes,
        "communication_calls": comm.calls,
        "collectives_per_block": per_block,
        "matmul_flops": flops.get_total_flops(),
        "peak_host_memory_bytes": peak_host_memory(),
    }
    if device.type == "cuda":
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    if top:
        result["top_operators"] = top_operators(lambda: trainer.train_step(micro), device, top)
    return result


def pyg_schnet_step(
    cfg: ModelConfig, n_atoms: int, steps: int, device: torch.device | None = None
) -> dict:
    """The baseline of ``profile_throughput.py --compare pyg``: SchNet of the same width, depth
    and radial basis size built from PyTorch Geometric's interaction blocks (message passing
    with its ``propagate``), trained on the same batch with the same loss (energy + forces
    through autograd) and AdamW, on ``device`` (default: CUDA if there is one, as megagnn's
    ranks). Needs ``pip install torch_geometric`` (not a dependency)."""
    try:
        from torch_geometric.nn.models.schnet import (
            GaussianSmearing,
            InteractionBlock,
            ShiftedSoftplus,
        )
    except ImportError as err:
        msg = "--compare pyg needs torch_geometric: pip install torch_geometric"
        raise RuntimeError(msg) from err
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = fixed_batch(n_atoms, cfg.cutoff)
    batch = {k: (v.float() if v.is_floating_point() else v).to(device) for k, v in batch.items()}
    hidden = cfg.hidden
    model = nn.ModuleDict(
        {
            "embedding": nn.Embedding(cfg.max_z + 1, hidden),
            "smearing": GaussianSmearing(0.0, cfg.cutoff, cfg.num_rbf),
            "blocks": nn.ModuleList(
                InteractionBlock(hidden, cfg.num_rbf, hidden, cfg.cutoff) for _ in range(cfg.layers)
            ),
            "head": nn.Sequential(
                nn.Linear(hidden, hidden // 2), ShiftedSoftplus(), nn.Linear(hidden // 2, 1)
            ),
        }
    ).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sender, receiver = batch[K.EDGE_INDEX]
    shift = torch.einsum("ei,ij->ej", batch[K.CELL_SHIFTS], batch[K.CELL][0])

    def step() -> None:
        pos = batch[K.POSITIONS].clone().requires_grad_(True)
        d = (pos[sender] - pos[receiver] + shift).norm(dim=-1)
        x = model["embedding"](batch[K.ATOMIC_NUMBERS])
        attr = model["smearing"](d)
        for block in model["blocks"]:
            x = x + block(x, batch[K.EDGE_INDEX], d, attr)
        energy = model["head"](x).sum()
        forces = -torch.autograd.grad(energy, pos, create_graph=True)[0]
        loss = (energy - batch[K.ENERGY].sum()) ** 2 / n_atoms**2 + (
            (forces - batch[K.FORCES]) ** 2
        ).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    params = list(model.parameters())
    return {
        "atoms": int(batch[K.N_ATOMS].sum()),
        "edges": int(sender.shape[0]),
        "step_time_s": statistics.median(times),
        "step_times_s": times,
        "parameters": sum(p.numel() for p in params),
    }
