"""Checkpoint conversion through an unsharded intermediate.

``consolidate``: a sharded training checkpoint of any tensor x pipeline layout -> one
``model.safetensors`` (global parameter names and shapes) + ``config.json``. The file is
streamed tensor by tensor (each read from the shards, written at its offset), so memory
stays at about the largest single weight, whatever the model size.

``reshard``: a sharded training checkpoint -> a new run folder whose checkpoint is written by
the ranks of another tensor x pipeline x data layout, with the optimizer moments, schedule,
data position and RNG state carried over, so training resumes there as from the original.
(Any layout can also resume the original directly; resharding lays the files out for the
new layout, so each rank reads its own, and records the layout in the saved config.)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from pathlib import Path

import torch
from tqdm import tqdm

from megagnn.training import checkpoint
from megagnn.training.checkpoint import CheckpointError
from megagnn.training.sources import SPLITS, recorded_run

SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.bool: "BOOL",
}
WEIGHTS, CONFIG = "model.safetensors", "config.json"


def read_tensor(dc, path: Path, key: str, meta, device: torch.device | str = "cpu") -> torch.Tensor:
    """One whole global tensor, assembled from the shards that hold it, on ``device`` (the
    communication device when every rank of a job reads it: one of them is its main
    replica)."""
    from megatron.core.dist_checkpointing import ShardedTensor

    target = torch.empty(meta.global_shape, dtype=meta.dtype, device=device)
    rank = torch.distributed.get_rank()  # dist_checkpointing() made a group if there was none
    wanted = {key: ShardedTensor.from_rank_offsets(key, target, replica_id=rank)}
    return checkpoint.load_raw(dc, wanted, path)[key]


def consolidate(
    source: str | Path, out_dir: str | Path, progress: bool = True, average: bool = True
) -> Path:
    """Write ``out_dir/model.safetensors`` and ``out_dir/config.json`` from a checkpoint
    (a checkpoint folder, a run folder or its ``checkpoints`` folder): the averaged weights
    where the run kept an average (train.ema_decay) and ``average``, else the trained ones."""
    path = checkpoint.resolve(source)
    common = checkpoint.read_common(path)
    dc = checkpoint.dist_checkpointing()
    meta = dc.load_tensors_metadata(str(path))
    keys = sorted(k for k in meta if k.startswith("model."))
    if not keys:
        raise CheckpointError(f"{path} holds no model weights")
    header: dict = {}
    offset = 0
    for key in keys:
        m = meta[key]
        nbytes = math.prod(m.global_shape) * m.dtype.itemsize
        header[key.removeprefix("model.")] = {
            "dtype": SAFETENSORS_DTYPES[m.dtype],
            "shape": list(m.global_shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    # the weights themselves: the average where there is one (same names and shapes)
    sources = {k: f"ema.{k.removeprefix('model.')}" for k in keys}
    sources = {k: v if average and v in meta else k for k, v in sources.items()}
    averaged = any(v != k for k, v in sources.items())
    header["__metadata__"] = {
        "format": "pt",
        "step": str(common["step"]),
        "weights": "ema" if averaged else "trained",
    }
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / (WEIGHTS + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for key in tqdm(keys, desc="consolidate", unit=" tensors", disable=not progress):
            tensor = read_tensor(dc, path, sources[key], meta[sources[key]]).contiguous()
            f.write(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out_dir / WEIGHTS)
    config = {"config": common["config"], "step": common["step"], "source": str(path)}
    config["weights"] = "ema" if averaged else "trained"
    if "statistics" in common:  # the training split's statistics travel with the weights
        config["statistics"] = common["statistics"]
    (out_dir / CONFIG).write_text(json.dumps(config, indent=1))
    run = recorded_run(path)  # the run's split travels too, for evaluation
    if run is not None:
        shutil.copyfile(run / SPLITS, out_dir / SPLITS)
    return out_dir / WEIGHTS


def reshard(source: str | Path, out_dir: str | Path, par) -> Path:
    """Collective: every rank of the target layout (``par``) calls it. Loads this rank's part
    of the model and optimizer from ``source`` (saved under any layout) and saves them as
    ``out_dir/checkpoints/step-N``. Returns that folder."""
    from megagnn.config import config_from_dict, config_to_dict
    from megagnn.training.build import DTYPES, build_rank_model, build_rank_optimizer
    from megagnn.training.ema import WeightAverage

    path = checkpoint.resolve(source)
    common = checkpoint.read_common(path)
    cfg = config_from_dict(common["config"])
    cfg.parallel.tensor, cfg.parallel.pipeline = par.tp_size, par.pp_size
    cfg.train.out_dir = str(out_dir)
    if par.pp_size > 1 and cfg.model.forces == "conservative":
        raise ValueError(
            f"{path} trains conservative forces, which pipeline stages cannot; "
            "reshard to pipeline=1"
        )
    dtype = DTYPES[cfg.train.precision]
    potential, stage = build_rank_model(cfg, par, dtype)  # as the Trainer builds it
    model = (stage or potential).to(par.device, dtype)
    optimizer = build_rank_optimizer(cfg, model, par)
    average = WeightAverage(model, cfg.train.ema_decay) if cfg.train.ema_decay else None
    loaded = checkpoint.load(path, model, optimizer, par, average)
    loaded["config"] = config_to_dict(cfg)
    return checkpoint.save(
        Path(out_dir) / "checkpoints",
        loaded["step"],
        model,
        optimizer,
        loaded,
        par,
        average=average,
    )


def is_consolidated(path: str | Path) -> bool:
    return (Path(path) / WEIGHTS).is_file() and (Path(path) / CONFIG).is_file()


def load_consolidated(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, state dict) of a consolidated checkpoint folder."""
    from safetensors.torch import load_file

    path = Path(path)
    info = json.loads((path / CONFIG).read_text())
    return info["config"], load_file(str(path / WEIGHTS))
