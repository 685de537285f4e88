"""Compiled training forward: energy, forces and stress as one traced graph, compiled by
Inductor, whose ordinary backward is the force loss's second derivative.

torch.compile cannot train on conservative forces directly: AOTAutograd does not support
double backward, so ``autograd.grad(create_graph=True)`` around a compiled region fails. So
the force function itself is traced (NequIP's approach, arXiv 2504.16068): ``make_fx`` runs
the potential with the derivatives taken by ``torch.func.grad`` and writes every op, the
backward of the energy included, into one graph of plain tensor ops, with the weights and
the batch as inputs and atoms, edges and structures as symbolic sizes. That graph is then
compiled like any other forward; the loss backward through it gives the weights' gradients.

Why ``torch.func.grad`` and not ``autograd.grad`` inside the trace: autograd keeps the
outputs an op saves for its backward (sqrt, norms, sigmoid, exp, ...) as detached aliases,
and a trace records those ``detach`` calls, which cuts the second derivative through them
(PaiNN's feature norms gave weight gradients off by 1e-3). functorch's levels keep its
inner bookkeeping out of the outer graph, so the trace is exact
(``tests/test_compiled.py`` compares every family with the eager force loss).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from megagnn import keys as K
from megagnn import ops
from megagnn.models.potential import Potential, stress_from_virial

# the batch tensors the potential reads, in the graph's input order, with their sizes that
# vary from batch to batch: atoms (N), edges (E), structures (B)
INPUTS = {
    K.POSITIONS: {0: "atoms"},
    K.ATOMIC_NUMBERS: {0: "atoms"},
    K.CELL: {0: "structures"},
    K.PBC: {0: "structures"},
    K.EDGE_INDEX: {1: "edges"},
    K.CELL_SHIFTS: {0: "edges"},
    K.BATCH: {0: "atoms"},
    K.HEAD: {0: "structures"},
}


class Outputs(nn.Module):
    """(energy, forces, stress, energies) of a batch given as the tensors of INPUTS, forces
    and stress as the derivatives ``torch.func.grad`` takes: the function that is traced,
    for training here and for the inference package (``megagnn.inference.package``). Stress
    is zeros unless asked for."""

    def __init__(self, model: Potential, forces: bool, stress: bool):
        super().__init__()
        self.model, self.forces, self.stress = model, forces, stress

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        batch = dict(zip(INPUTS, tensors, strict=True))
        model, pos = self.model, batch[K.POSITIONS]
        conservative = self.forces and model.cfg.forces == "conservative"
        if not conservative:
            out = model.energy_terms(batch, pos, None, self.forces, False)
            forces = out.get(K.FORCES, torch.zeros_like(pos))
            return out[K.ENERGY], forces, torch.zeros_like(batch[K.CELL]), out[K.ENERGIES]

        def energy(pos, strain):
            out = model.energy_terms(batch, pos, strain, False, True)
            return out[K.ENERGY].sum(), out

        strain = torch.zeros_like(batch[K.CELL]) if self.stress else None
        argnums = (0, 1) if self.stress else 0
        grads, out = torch.func.grad(energy, argnums=argnums, has_aux=True)(pos, strain)
        if not self.stress:
            return out[K.ENERGY], -grads, torch.zeros_like(batch[K.CELL]), out[K.ENERGIES]
        stress = stress_from_virial(grads[1], batch)
        return out[K.ENERGY], -grads[0], stress, out[K.ENERGIES]


@contextlib.contextmanager
def _no_duck_shapes():
    """Sizes that happen to be equal in the example (a weight's 16 channels and 16
    structures) must not be unified into one symbol, or the graph only fits that batch."""
    from torch.fx.experimental import _config

    before = _config.use_duck_shape
    _config.use_duck_shape = False
    try:
        yield
    finally:
        _config.use_duck_shape = before


def with_empty_structure(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``batch`` with a second structure of no atoms (unit cell, not periodic, head 0): its
    energy and stress are zero and nothing reaches the first's, and the batch fits the graph
    of any number of structures."""
    out = dict(batch)
    cell = batch[K.CELL]
    out[K.CELL] = torch.cat([cell, torch.eye(3, dtype=cell.dtype, device=cell.device)[None]])
    out[K.PBC] = torch.cat([batch[K.PBC], torch.zeros_like(batch[K.PBC][:1])])
    out[K.HEAD] = torch.cat([batch[K.HEAD], torch.zeros_like(batch[K.HEAD][:1])])
    return out


def trace(model: Potential, batch: dict[str, torch.Tensor], forces: bool, stress: bool):
    """The graph of ``model``'s outputs on batches shaped like ``batch``: a GraphModule taking
    (weights and buffers in ``named_parameters``/``named_buffers`` order, then the batch
    tensors of INPUTS) and returning (energy [B], forces [N, 3], stress [B, 3, 3], energies
    [N])."""
    from torch.fx.experimental.proxy_tensor import make_fx

    names, state = _state(model)
    outputs = Outputs(model, forces, stress)

    def function(*args):
        weights = {f"model.{n}": t for n, t in zip(names, args[: len(names)], strict=True)}
        return torch.func.functional_call(outputs, weights, tuple(args[len(names) :]))

    example = [t.detach() for t in state] + [batch[k] for k in INPUTS]
    # the graph is made of the PyTorch references: Inductor generates the kernels
    with ops.tracing_for_compiler(), _no_duck_shapes():
        return make_fx(function, tracing_mode="symbolic", _allow_non_fake_inputs=True)(*example)


def _state(model: Potential) -> tuple[list[str], list[torch.Tensor]]:
    pairs = list(model.named_parameters()) + list(model.named_buffers())
    return [n for n, _ in pairs], [t for _, t in pairs]


def remove_truncated_kernels(cache: Path, age_s: float = 60.0) -> list[Path]:
    """Delete the kernel libraries in Inductor's cache ``cache`` that are shorter than an
    ELF header and older than ``age_s`` (a link writes its library in well under that), and
    return them. A process killed while Inductor links a kernel leaves such a file behind;
    Inductor does not rebuild a library that exists, so every later compile of that kernel,
    forward or backward, would fail with "file too short" (pytorch/pytorch#102539)."""
    removed = []
    now = time.time()
    for path in cache.glob("*/*.so"):
        with contextlib.suppress(OSError):  # another process may remove it first
            info = path.stat()
            if info.st_size < 64 and now - info.st_mtime > age_s:
                path.unlink()
                removed.append(path)
    return removed


def clean_inductor_cache(log: Callable = lambda text: None) -> None:
    """`remove_truncated_kernels` on Inductor's cache, before a compile reads it."""
    # imported here: importing Inductor costs every trainer 0.3 s, compiled or not
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    for path in remove_truncated_kernels(Path(cache_dir())):
        log(f"removed a truncated kernel from Inductor's cache: {path}")


class CompiledForward:
    """``compiled(batch)`` returns what ``model(batch)`` does in training (energy, forces,
    stress, energies) from one compiled graph per kind of batch (forces, stress, dtype,
    autocast). The model keeps its weights: they are the graph's inputs at every call, so
    optimizers, weight averages and checkpoints see the module as always.

    ``backend``: torch.compile's ("inductor"; "aot_eager" checks the graph without code
    generation). Batches of any size reuse the graph: atoms, edges and structures are
    dynamic dimensions (a batch of a single structure is given an empty second one, since
    a size of 1 would be specialised and compile again). Inductor's CPU code still splits
    sizes into a few ranges: it sums more than 4,096 fp32 terms in chunks, and sorts fewer
    than 32,767 edges with its own kernel. The first batch across such a bound compiles once
    more (molecules with under 4,096 edges after periodic cells with more), and never again.
    Marking the sizes unbacked, which would avoid that, fails in Inductor's passes."""

    def __init__(self, model: Potential, backend: str = "inductor", log: Callable | None = None):
        self.model = model
        self.backend = backend
        self.log = log or (lambda text: None)
        self.graphs: dict[tuple, Callable] = {}
        self.compile_s = 0.0
        if backend == "inductor":
            clean_inductor_cache(self.log)

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        model = self.model
        forces, stress = model.outputs()
        device = batch[K.POSITIONS].device
        fast = torch.get_autocast_dtype(device.type)
        autocast = fast if torch.is_autocast_enabled(device.type) else None
        key = (forces, stress, batch[K.POSITIONS].dtype, device, autocast)
        structures = batch[K.CELL].shape[0]
        if structures == 1:  # sizes of 1 are specialised: this batch would compile again
            batch = with_empty_structure(batch)
        new = key not in self.graphs
        start = time.perf_counter()
        if new:
            graph = trace(model, batch, forces, stress)
            self.graphs[key] = torch.compile(graph, backend=self.backend)
        _, state = _state(model)
        inputs = [batch[k] for k in INPUTS]
        for t, dims in zip(inputs, INPUTS.values(), strict=True):
            for dim in dims:  # a single atom or edge still compiles once more
                if t.shape[dim] > 1:
                    torch._dynamo.mark_dynamic(t, dim)
        # autocast's casts are in the graph already: run it as traced
        with torch.autocast(device.type, enabled=False), _no_duck_shapes():
            energy, f, s, energies = self.graphs[key](*state, *inputs)
        energy, s = energy[:structures], s[:structures]
        if new:  # the first call compiles
            seconds = time.perf_counter() - start
            self.compile_s += seconds
            self.log(f"compiled the training forward in {seconds:.0f} s")
        out = {K.ENERGY: energy, K.ENERGIES: energies}
        if forces:
            out[K.FORCES] = f
        if stress:
            out[K.STRESS] = s
        return out
