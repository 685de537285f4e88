"""Run under torchrun: compare tensor- and data-parallel models with the unsharded model.

Every rank also builds the single-device reference from the same seed and data, so the
comparison needs no second run: outputs, the loss, every parameter's gradient (force loss
included, which differentiates through the collectives twice) and the weights after one
AdamW step must agree to fp64 round-off.

    torchrun --nproc_per_node=2 tests/distributed/worker.py --tensor 2
    torchrun --nproc_per_node=2 tests/distributed/worker.py --tensor 1   # data parallel
"""

import argparse
import copy
import sys

import torch
from ase.build import bulk, molecule

from megagnn import keys as K
from megagnn.config import ModelConfig, ParallelConfig, TrainConfig
from megagnn.data import collate, structure_to_graph, to_device
from megagnn.models import build_model
from megagnn.parallel.data import average_gradients, clip_grad_norm
from megagnn.parallel.layers import _shard, is_sharded
from megagnn.parallel.state import destroy_parallel, init_parallel
from megagnn.parallel.tensor import parallelize_tensor
from megagnn.training.loss import loss_terms

TOL = dict(rtol=1e-9, atol=1e-11)


def structures():
    a = bulk("Cu", "fcc", a=3.7) * (2, 2, 1)
    a.numbers[::3] = 79
    a.rattle(0.1, seed=1)
    b = bulk("Cu", "fcc", a=3.6, cubic=True)
    b.rattle(0.1, seed=2)
    c = molecule("CH3CH2OH")
    c.rattle(0.05, seed=3)
    return [a, b, c]


def batch_of(atoms_list, seed):
    g = torch.Generator().manual_seed(seed)
    graphs = []
    for a in atoms_list:
        rec = {
            "atomic_numbers": a.numbers,
            "positions": a.positions,
            "cell": a.cell[:],
            "pbc": a.pbc,
            "energy": float(torch.randn(1, generator=g)) - 3.0 * len(a),
            "forces": torch.randn(len(a), 3, generator=g).numpy(),
            "stress": 0.01 * torch.randn(3, 3, generator=g).numpy(),
        }
        rec["stress"] = rec["stress"] + rec["stress"].T
        graphs.append(structure_to_graph(rec, 4.0))
    return to_device(collate(graphs), "cpu", torch.float64)


def run(model, batch, train_cfg):
    out = model(batch)
    loss = loss_terms(out, batch, model.scale, train_cfg)["total"]
    model.zero_grad(set_to_none=True)
    loss.backward()
    return out, loss


def sharded_like(ref_tensor, module, name, group):
    """The piece of a full tensor that this rank's parallel module holds."""
    if not is_sharded(module, name):
        return ref_tensor
    dim = module.partition_dim if ref_tensor.dim() > 1 else 0
    return _shard(ref_tensor, dim, getattr(module, "chunks", 1), group)


def compare_params(ref, par, group, what):
    ref_modules = dict(ref.named_modules())
    checked = 0
    for mname, module in par.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            r = getattr(ref_modules[mname], pname)
            r = r.grad if what == "grad" else r.detach()
            q = p.grad if what == "grad" else p.detach()
            expected = sharded_like(r, module, pname, group)
            torch.testing.assert_close(
                q, expected, **TOL, msg=lambda m, n=f"{mname}.{pname}": f"{what} {n}: {m}"
            )
            checked += 1
    return checked


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tensor", type=int, default=2)
    args = ap.parse_args()
    state = init_parallel(ParallelConfig(tensor=args.tensor))
    train_cfg = TrainConfig(energy_weight=1.0, force_weight=1.0, stress_weight=1.0)
    report = []
    for family in ("schnet", "painn"):
        for forces in ("conservative", "direct"):
            torch.manual_seed(0)
            cfg = ModelConfig(
                family=family,
                hidden=16,
                layers=2,
                num_rbf=8,
                radial_hidden=8,
                cutoff=4.0,
                forces=forces,
                stress=forces == "conservative",
            )
            ref = build_model(cfg).double().train()
            ref.set_statistics(0, {29: -3.0, 79: -2.5, 1: -13.0, 6: -1000.0, 8: -430.0}, 0.5, 10.0)
            par = parallelize_tensor(copy.deepcopy(ref), state.tp_group)

            if state.dp_size > 1:  # each data-parallel rank gets its own batch
                batches = [batch_of(structures()[:2], seed=10 + r) for r in range(state.dp_size)]
                mine = batches[state.dp_rank]
                grads = []
                for b in batches:
                    run(ref, b, train_cfg)
                    grads.append({n: p.grad.clone() for n, p in ref.named_parameters()})
                for n, p in ref.named_parameters():
                    p.grad = sum(g[n] for g in grads) / len(grads)
                out, loss = run(par, mine, train_cfg)
                average_gradients(par, state.dp_group)
            else:
                mine = batch_of(structures(), seed=10)
                ref_out, ref_loss = run(ref, mine, train_cfg)
                out, loss = run(par, mine, train_cfg)
                for key in (K.ENERGY, K.FORCES, K.STRESS):
                    if key in ref_out:
                        torch.testing.assert_close(out[key], ref_out[key], **TOL)
                torch.testing.assert_close(loss, ref_loss, **TOL)
            n_grads = compare_params(ref, par, state.tp_group, "grad")

            norm_ref = clip_grad_norm(ref, 0.05, None)
            norm_par = clip_grad_norm(par, 0.05, state.tp_group)
            torch.testing.assert_close(norm_par, norm_ref, **TOL)
            for model in (ref, par):
                opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
                opt.step()
            compare_params(ref, par, state.tp_group, "weight")
            report.append(f"{family}/{forces}: {n_grads} parameters agree")
    if state.is_main:
        layout = f"tensor={state.tp_size} data={state.dp_size}"
        print("\n".join(f"[{layout}] {line}" for line in report))
        print("PARALLEL CHECKS PASSED")
    destroy_parallel()


if __name__ == "__main__":
    sys.exit(main())
