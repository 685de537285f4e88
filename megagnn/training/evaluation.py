"""Errors of a model on one pass over a split, optionally split over data-parallel ranks."""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm import tqdm

from megagnn import keys as K
from megagnn.config import LossConfig
from megagnn.data.graph import to_device
from megagnn.data.sampler import BudgetBatchSampler, GraphDataset, iterate_batches
from megagnn.models import Potential
from megagnn.ops import segment_sum
from megagnn.training.loss import ErrorMeter, loss_terms


def evaluate(
    model: Potential,
    graphs: GraphDataset,
    sampler: BudgetBatchSampler,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool = False,
    predict: Callable[[dict], dict | None] | None = None,
    loss_cfg: LossConfig | None = None,
    group=None,
    predictions: list[tuple[int, int, float, float]] | None = None,
) -> dict[str, float]:
    """Mean absolute errors on one pass over the sampler's batches, with trivial baselines,
    and with ``loss_cfg`` the training loss (``loss``: mean over structures).

    ``predict`` (default: ``model``) may return None on ranks that hold no predictions (the
    pipeline's first stages); they return an empty dict. With a data-parallel ``group``
    each rank evaluates its share of the batches and the errors are summed over the group.
    ``predictions`` (one process): gets (record index, atoms, predicted energy, reference
    energy) per labelled structure, energies in eV.
    """
    was_training = model.training
    model.eval()
    predict = predict or model
    meter = ErrorMeter()
    loss_sum, structures = 0.0, 0
    batches = iterate_batches(graphs, sampler, epoch=0)
    indices = sampler.batches(0)  # the record indices of each batch, in order
    bar = tqdm(
        batches,
        total=len(indices),
        desc="evaluate",
        unit=" batches",
        leave=False,
        disable=not progress,
    )
    for records, batch in zip(indices, bar, strict=True):
        batch = to_device(batch, device, dtype)
        pred = predict(batch)
        if pred is None:
            continue
        if predictions is not None:
            has = batch[K.HAS_ENERGY].tolist()
            rows = zip(
                records.tolist(),
                batch[K.N_ATOMS].tolist(),
                pred[K.ENERGY].detach().double().tolist(),
                batch[K.ENERGY].tolist(),
                strict=True,
            )
            predictions += [row for row, labelled in zip(rows, has, strict=True) if labelled]
        atom_ref = model.atomic_energies[batch[K.HEAD][batch[K.BATCH]], batch[K.ATOMIC_NUMBERS]]
        ref = segment_sum(atom_ref.double(), batch[K.BATCH], len(batch[K.ENERGY]))
        meter.update(pred, batch, ref)
        if loss_cfg is not None:
            total = loss_terms(pred, batch, model.scale, loss_cfg)["total"]
            loss_sum += float(total.detach()) * len(batch[K.ENERGY])
            structures += len(batch[K.ENERGY])
    model.train(was_training)
    if group is not None:
        meter.all_reduce(group, device)
        totals = torch.tensor([loss_sum, structures], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(totals, group=group)
        loss_sum, structures = totals[0].item(), round(totals[1].item())
    result = meter.result()
    if structures:
        result["loss"] = loss_sum / structures
    return result
