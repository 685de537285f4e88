"""Compiled training (train.compile): the traced graph of energy, forces and stress against
the eager model, on the outputs and on the force loss's weight gradients (the second
derivative), for every family; batches of other sizes reuse the graph; training runs compiled
step for step like eager and resumes."""

import functools
import os
import time

import pytest
import torch
from test_physics import CUTOFF, alloy, make_model, mol
from test_training import run_losses, tiny_config

from megagnn import keys as K
from megagnn.config import ConfigError, load_config
from megagnn.data import atoms_to_graph, collate, to_device
from megagnn.models.compiled import INPUTS, CompiledForward, trace
from megagnn.training.trainer import Trainer

# irrep-c2: IrrepNet with the second-order product of its neighbour sums (a superset of the
# first-order model's code path, which the slow test runs too)
FAMILIES = ["schnet", "painn", "egnn", "irrep-c2"]


def small_model(family, forces="conservative"):
    model = make_model(family, forces, hidden=8, num_rbf=4, radial_hidden=8)
    return model.train()


def batch_of(structures):
    graphs = [atoms_to_graph(a, CUTOFF) for a in structures]
    return to_device(collate(graphs), "cpu", torch.float64)


def force_loss(out):
    loss = (out[K.ENERGY] ** 2).sum()
    for key, weight in ((K.FORCES, 3.0), (K.STRESS, 1.0)):
        loss = loss + weight * (out[key] ** 2).sum() if key in out else loss
    return loss


def outputs_and_gradients(forward, model, batch):
    model.zero_grad()
    out = forward(batch)
    force_loss(out).backward()
    return out, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("family", FAMILIES)
def test_traced_graph_matches_eager_outputs_and_force_loss_gradients(family):
    """The trace is where correctness lives (what Inductor then compiles is this graph):
    one graph, traced on one batch, against the eager model on batches of other sizes."""
    model = small_model(family)
    first = batch_of([alloy(0), mol()])  # a periodic crystal beside a molecule
    graph = trace(model, first, forces=True, stress=True)
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    state = dict(model.named_parameters()) | dict(model.named_buffers())

    def traced(batch):
        energy, forces, stress, energies = graph(
            *[state[n] for n in names], *[batch[k] for k in INPUTS]
        )
        return {K.ENERGY: energy, K.FORCES: forces, K.STRESS: stress, K.ENERGIES: energies}

    for batch in (first, batch_of([alloy(1), alloy(2), mol()])):
        ref, ref_grads = outputs_and_gradients(model, model, batch)
        out, grads = outputs_and_gradients(traced, model, batch)
        for key in (K.ENERGY, K.ENERGIES, K.FORCES, K.STRESS):
            torch.testing.assert_close(out[key], ref[key], rtol=1e-10, atol=1e-12)
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("forces", ["conservative", "direct", "none"])
def test_compiled_forward_matches_eager_without_recompiling(forces):
    model = small_model("painn" if forces == "conservative" else "schnet", forces)
    model.labels_forces = forces != "none"
    compiled = CompiledForward(model, backend="aot_eager")
    torch._dynamo.utils.counters.clear()
    # a single structure first (traced with an empty second one), then two, then one
    # molecule: one graph for all
    singles = [batch_of([alloy(0)]), batch_of([alloy(1), mol()]), batch_of([mol()])]
    for batch in singles:
        ref, ref_grads = outputs_and_gradients(model, model, batch)
        out, grads = outputs_and_gradients(compiled, model, batch)
        assert set(out) == set(ref)
        for key in ref:
            torch.testing.assert_close(out[key], ref[key], rtol=1e-10, atol=1e-12)
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)
    assert len(compiled.graphs) == 1
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # no recompile


@pytest.mark.slow
@pytest.mark.parametrize("family", [*FAMILIES, "irrep"])
def test_inductor_compiled_forward_matches_eager(family):
    """The real backend: Inductor's generated code (minutes per family on 2 cores)."""
    model = small_model(family)
    compiled = CompiledForward(model)
    for batch in (batch_of([alloy(0), mol()]), batch_of([alloy(1), alloy(2)])):
        ref, ref_grads = outputs_and_gradients(model, model, batch)
        out, grads = outputs_and_gradients(compiled, model, batch)
        for key in (K.ENERGY, K.FORCES, K.STRESS):
            torch.testing.assert_close(out[key], ref[key], rtol=1e-9, atol=1e-11)
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-11)
    assert compiled.compile_s > 0


@pytest.fixture
def fast_compile(monkeypatch):
    """The trainer's compiled forward without code generation (AOTAutograd's eager
    backend): the same graph, in seconds instead of minutes."""
    fast = functools.partial(CompiledForward, backend="aot_eager")
    monkeypatch.setattr("megagnn.training.trainer.CompiledForward", fast)


def test_compiled_training_follows_eager_and_resumes(emt_dataset, tmp_path, fast_compile):
    args = ("model.family=schnet", "model.layers=1", "train.precision=fp64")
    eager = run_losses(Trainer(tiny_config(emt_dataset, tmp_path / "eager", *args)))
    compiled = Trainer(tiny_config(emt_dataset, tmp_path / "a", *args, "train.compile=true"))
    assert isinstance(compiled.forward, CompiledForward)
    torch.testing.assert_close(run_losses(compiled), eager, rtol=1e-9, atol=0)
    # killed after 4 steps (a checkpoint at 3), rerun: the same losses from step 4 on
    crashed = Trainer(tiny_config(emt_dataset, tmp_path / "b", *args, "train.compile=true"))
    with pytest.raises(KeyboardInterrupt):
        run_losses(crashed, crash_after=4)
    resumed = Trainer(tiny_config(emt_dataset, tmp_path / "b", *args, "train.compile=true"))
    torch.testing.assert_close(run_losses(resumed), eager[3:], rtol=1e-9, atol=0)


@pytest.mark.parametrize(
    "extra",
    [
        ["parallel.pipeline=2", "model.forces=direct", "model.stress=false"],
        ["parallel.tensor=2", "parallel.node_parallel=true"],
        ["train.recompute_activations=true"],
    ],
    ids=str,
)
def test_compile_refuses_what_it_cannot_trace(extra):
    with pytest.raises(ConfigError, match="train.compile"):
        load_config(None, ["train.compile=true", *extra])


def test_truncated_kernels_left_by_a_killed_compile_are_removed(tmp_path, monkeypatch):
    """A killed link leaves an empty library that Inductor would load forever after: the
    compiled forward clears such files from Inductor's cache before it compiles."""
    old = time.time() - 3600
    stale = tmp_path / "k2" / "ck2w.main.so"
    fresh = tmp_path / "k3" / "ck3w.main.so"  # a link that may be under way: left alone
    whole = tmp_path / "k4" / "ck4w.main.so"
    for path, data, mtime in ((stale, b"", old), (fresh, b"", None), (whole, b"\x7fELF" * 64, old)):
        path.parent.mkdir()
        path.write_bytes(data)
        if mtime:
            os.utime(path, (mtime, mtime))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    messages = []
    CompiledForward(small_model("schnet"), log=messages.append)
    assert not stale.exists() and fresh.exists() and whole.exists()
    assert messages == [f"removed a truncated kernel from Inductor's cache: {stale}"]
