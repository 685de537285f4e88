"""Structures too large for per-edge tensors: edges evaluated chunk by chunk (ChunkedEdges)
give the unchunked energies, forces and stress, and keep O(atoms) tensors for backward."""

import pytest
import torch
from test_physics import CUTOFF, FAMILIES, alloy, make_model, mol

from megagnn import keys as K
from megagnn.data import atoms_to_graph, to_device
from megagnn.models.edges import chunk_bounds


def _outputs(model, atoms, chunk, shuffle=False):
    model.edge_chunk = chunk
    batch = to_device(atoms_to_graph(atoms, CUTOFF), "cpu", torch.float64)
    if shuffle:  # edges in no order: the chunks need them by receiver
        order = torch.randperm(
            batch[K.EDGE_INDEX].shape[1], generator=torch.Generator().manual_seed(0)
        )
        batch[K.EDGE_INDEX], batch[K.CELL_SHIFTS] = (
            batch[K.EDGE_INDEX][:, order],
            batch[K.CELL_SHIFTS][order],
        )
    out = model(batch)
    return {k: out[k].detach() for k in (K.ENERGY, K.FORCES, K.STRESS) if k in out}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("forces", ["conservative", "direct"])
def test_chunked_edges_match_unchunked(family, forces):
    model = make_model(family, forces=forces)
    for atoms in (alloy(), mol()):
        full = _outputs(model, atoms, None)
        # 7 edges per chunk: every atom of the alloy has more, so each is a chunk of its own
        # and the molecule's chunks hold several atoms; 50: ranges of whole atoms
        for chunk, shuffle in ((7, False), (50, True)):
            chunked = _outputs(model, atoms, chunk, shuffle)
            assert chunked.keys() == full.keys()
            for key in full:
                torch.testing.assert_close(chunked[key], full[key], rtol=1e-10, atol=1e-10)


def test_chunk_bounds_cover_every_node_in_whole_receivers():
    receiver = torch.tensor([0, 0, 0, 2, 2, 5, 5, 5, 5, 5, 6])  # nodes 1, 3, 4, 7 have none
    bounds = chunk_bounds(receiver, 8, 4)
    assert bounds[0][2] == 0 and bounds[-1][3] == 8
    for (e0, e1, n0, n1), nxt in zip(bounds, bounds[1:] + [None], strict=True):
        assert nxt is None or (nxt[0], nxt[2]) == (e1, n1)  # contiguous
        assert e1 - e0 <= 4 or n1 - n0 == 1  # at most 4 edges, or one node with more
        assert ((receiver[e0:e1] >= n0) & (receiver[e0:e1] < n1)).all()
    assert bounds[-1][1] == len(receiver)


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for backward while ``fn`` runs (those saved
    inside a checkpoint are not: it recomputes them)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def _large():
    model = make_model("painn", hidden=32)
    atoms = alloy() * (3, 3, 3)  # 216 atoms, 3,834 edges at 4 Å
    batch = to_device(atoms_to_graph(atoms, CUTOFF), "cpu", torch.float64)
    batch[K.POSITIONS].requires_grad_(True)
    return model, batch


def test_a_chunked_message_keeps_no_per_edge_tensors_for_backward():
    model, batch = _large()

    def block():
        edges, _ = model.edges(batch, batch[K.POSITIONS], batch[K.CELL])
        model.backbone.blocks[0](model.embed(batch[K.ATOMIC_NUMBERS]), edges)

    model.edge_chunk = None
    full = _saved_bytes(block)
    model.edge_chunk = 500
    assert _saved_bytes(block) < full / 5


def test_chunked_forces_keep_one_node_state_per_block_for_backward():
    """Each block is recomputed too: backward holds the blocks' inputs, not their
    activations."""
    model, batch = _large()
    model.edge_chunk = 500
    state = sum(t.numel() * t.element_size() for t in model.embed(batch[K.ATOMIC_NUMBERS]))
    saved = _saved_bytes(lambda: model(batch))
    assert saved < len(model.backbone.blocks) * state, (saved, state)
