"""Run under torchrun: compare tensor-, pipeline- and data-parallel models with the unsharded
model.

Every rank also builds the single-device reference from the same seed and data, so the
comparison needs no second run: outputs, the loss, every parameter's gradient (force loss
included, which differentiates through the collectives twice) and the weights after one
AdamW step must agree to fp64 round-off.

    torchrun --nproc_per_node=2 tests/distributed/worker.py --tensor 2
    torchrun --nproc_per_node=2 tests/distributed/worker.py --tensor 1   # data parallel
    torchrun --nproc_per_node=4 tests/distributed/worker.py --tensor 2 --pipeline 2
    torchrun --nproc_per_node=2 tests/distributed/worker.py --tensor 2 --node-parallel
    torchrun --nproc_per_node=2 tests/distributed/worker.py --tensor 2 --compile
"""

import argparse
import copy
import sys

import torch
from ase.build import bulk, molecule

from megagnn import keys as K
from megagnn import ops
from megagnn.config import LossConfig, ModelConfig, ParallelConfig
from megagnn.data import collate, structure_to_graph, to_device
from megagnn.models import build_model
from megagnn.models.compiled import CompiledForward
from megagnn.parallel.data import (
    average_gradients,
    build_optimizer,
    clip_grad_norm,
    local_optimizer,
)
from megagnn.parallel.layers import is_sharded, shard
from megagnn.parallel.materialize import materialize
from megagnn.parallel.pipeline import PipelineStage, forward_backward, global_name
from megagnn.parallel.state import destroy_parallel, init_parallel
from megagnn.parallel.tensor import parallelize_tensor
from megagnn.training.loss import loss_terms

TOL = dict(rtol=1e-9, atol=1e-11)
# c2: model.correlation=2; cueq (not among the defaults): model.tensor_product=cueq
FAMILIES = ("schnet", "painn", "egnn", "irrep", "irrep-c2")


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


def run(model, batches, train_cfg, forward=None):
    """Mean loss over ``batches`` (microbatches) and its gradients, as the trainer takes them
    (``forward``: the model's outputs another way, e.g. compiled). Returns the last
    microbatch's predictions and the mean loss (None off the last stage)."""
    model.zero_grad(set_to_none=True)

    def loss_fn(batch, pred):
        loss = loss_terms(pred, batch, model_scale(model), train_cfg)["total"]
        return loss, {"loss": loss.detach().clone(), **{k: v.detach() for k, v in pred.items()}}

    if isinstance(model, PipelineStage):
        results = forward_backward(model, batches, loss_fn)
    else:
        results = []
        for batch in batches:
            loss, out = loss_fn(batch, (forward or model)(batch))
            (loss / len(batches)).backward()
            results.append(out)
    if not results:
        return None, None
    return results[-1], sum(r["loss"] for r in results) / len(results)


def model_scale(model):
    return (model.model if isinstance(model, PipelineStage) else model).scale


def reference_name(name, model):
    """The unsharded model's name for a parameter or module of ``model``."""
    if not isinstance(model, PipelineStage):
        return name
    return global_name(name.removeprefix("model").removeprefix("."), model.first_layer)


def sharded_like(ref_tensor, module, name, group):
    """The piece of a full tensor that this rank's parallel module holds."""
    if not is_sharded(module, name):
        return ref_tensor
    dim = module.partition_dim if ref_tensor.dim() > 1 else 0
    return shard(ref_tensor, dim, group)


def compare_params(ref, par, group, what):
    ref_modules = dict(ref.named_modules())
    checked = 0
    for mname, module in par.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            r = getattr(ref_modules[reference_name(mname, par)], pname)
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
    ap.add_argument("--pipeline", type=int, default=1)
    ap.add_argument("--backend", default="torch", help="megagnn.ops backend of the parallel model")
    ap.add_argument("--node-parallel", action="store_true", help="node-parallel regions too")
    ap.add_argument("--families", default=",".join(FAMILIES), help="model families to check")
    ap.add_argument(
        "--compile", action="store_true", help="the parallel model through train.compile's graph"
    )
    ap.add_argument("--layers", type=int, default=3, help="interaction blocks of the models")
    ap.add_argument("--forces", help="one force mode to check (default: those the layout trains)")
    args = ap.parse_args()
    layout = ParallelConfig(tensor=args.tensor, pipeline=args.pipeline)
    state = init_parallel(layout)
    train_cfg = LossConfig(energy_weight=1.0, force_weight=1.0, stress_weight=1.0)
    # conservative forces are refused under pipeline parallelism (config check)
    force_modes = ("direct", "none") if args.pipeline > 1 else ("conservative", "direct")
    force_modes = (args.forces,) if args.forces else force_modes
    # a pipeline runs two microbatches, so 1F1B overlaps them and gradients accumulate
    n_micro = 2 if args.pipeline > 1 else 1
    report = []
    families = args.families.split(",")
    for family in families:
        for forces in force_modes:
            torch.manual_seed(0)
            cfg = ModelConfig(
                family=family.partition("-")[0],
                correlation=2 if "-c2" in family else 1,
                tensor_product="cueq" if family.endswith("-cueq") else "auto",
                hidden=16,
                layers=args.layers,
                num_rbf=8,
                radial_hidden=8,
                cutoff=4.0,
                forces=forces,
                stress=forces == "conservative",
            )
            # built on the meta device and materialised for this rank only, a model starts
            # from this rank's slice of the unsharded model's initial weights
            full = materialize(build_model(cfg, device="meta"), seed=7)
            mine = parallelize_tensor(
                build_model(cfg, device="meta"), state.tp_group, args.node_parallel
            )
            if state.pp_size > 1:
                mine = PipelineStage(mine, state, torch.float32)
            compare_params(full, materialize(mine, seed=7), state.tp_group, "weight")

            ref = build_model(cfg).double().train()
            ref.set_statistics(0, {29: -3.0, 79: -2.5, 1: -13.0, 6: -1000.0, 8: -430.0}, 0.5, 10.0)
            par = parallelize_tensor(copy.deepcopy(ref), state.tp_group, args.node_parallel)
            if state.pp_size > 1:
                par = PipelineStage(par, state, torch.float64)

            def microbatches(rank):
                # 13 atoms, then 8: node-parallel regions pad odd atom counts
                atoms, first = structures(), [1, 0]
                return [
                    batch_of(atoms[first[m] : first[m] + 2], seed=10 + 7 * rank + m)
                    for m in range(n_micro)
                ]

            if state.dp_size > 1:  # each data-parallel rank gets its own batches
                grads = []
                for r in range(state.dp_size):
                    run(ref, microbatches(r), train_cfg)
                    grads.append({n: p.grad.clone() for n, p in ref.named_parameters()})
                for n, p in ref.named_parameters():
                    p.grad = sum(g[n] for g in grads) / len(grads)
                run(par, microbatches(state.dp_rank), train_cfg)
                average_gradients(par, state.dp_group)
            else:
                mine = microbatches(0)
                ref_out, ref_loss = run(ref, mine, train_cfg)
                # the graph compiles without code generation (aot_eager): the trace is tested
                forward = CompiledForward(par, backend="aot_eager") if args.compile else None
                with ops.use_backend(args.backend):
                    out, loss = run(par, mine, train_cfg, forward)
                if state.is_last_stage:
                    for key in (K.ENERGY, K.FORCES, K.STRESS):
                        if key in ref_out:
                            torch.testing.assert_close(out[key], ref_out[key], **TOL)
                    torch.testing.assert_close(loss, ref_loss, **TOL)
            n_grads = compare_params(ref, par, state.tp_group, "grad")

            norm_ref = clip_grad_norm(ref, 0.05, None)
            norm_par = clip_grad_norm(par, 0.05, state.tp_group, state.pp_group)
            torch.testing.assert_close(norm_par, norm_ref, **TOL)
            torch.optim.AdamW(ref.parameters(), lr=1e-2).step()
            # under data parallelism the AdamW state is sharded over the replicas (ZeRO-1)
            opt = build_optimizer(par.parameters(), 1e-2, 1e-2, state.dp_group)
            opt.step()
            owned = sum(len(g["params"]) for g in local_optimizer(opt).param_groups)
            n_params = len(list(par.parameters()))
            assert owned < n_params if state.dp_size > 1 else owned == n_params
            compare_params(ref, par, state.tp_group, "weight")
            report.append(f"{family}/{forces}: {n_grads} parameters agree")
    lines = [f"[rank {state.rank} pipeline stage {state.pp_rank}] {x}" for x in report]
    print("\n".join(lines))
    torch.distributed.barrier()
    if state.is_main:
        print("PARALLEL CHECKS PASSED")
    destroy_parallel()


if __name__ == "__main__":
    sys.exit(main())
