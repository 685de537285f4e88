"""A run's datasets: each one's train/val/test split by group, its training statistics,
graphs at the model's cutoff, head, sampling weight and position in its epochs (multi-head
pretraining reads several)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from megagnn.config import Config, ConfigError
from megagnn.data.sampler import BudgetBatchSampler, GraphDataset, iterate_batches
from megagnn.data.shards import DataError, ShardedDataset
from megagnn.data.splits import split_by_group, train_subset
from megagnn.data.statistics import pooled_avg_num_neighbors, scale_of, training_statistics
from megagnn.elements import check_max_z
from megagnn.models import Potential

SPLITS = "splits.npz"
STATISTICS = "statistics.json"
SPLIT_NAMES = ("train", "val", "test")


class DataSplits:
    """The dataset, its graphs at the model's cutoff and its train/val/test split by group
    (``indices``: record indices in dataset order; ``recorded`` replaces the computed split
    with a run's own, from its splits.npz)."""

    def __init__(
        self,
        cfg: Config,
        rank: int = 0,
        world_size: int = 1,
        path: str | None = None,
        head: int = 0,
        recorded: dict[str, np.ndarray] | None = None,
    ):
        path = path or cfg.data.path
        self.path = path
        self.dataset = ShardedDataset(path)
        # an atomic number beyond the embedding would fail mid-run with an IndexError
        check_max_z(self.dataset.manifest.get("elements", []), cfg.model.max_z, str(path))
        self.graphs = GraphDataset(self.dataset, cfg.model.cutoff, head)
        if recorded is not None:
            self.indices = {name: np.asarray(recorded[name], np.int64) for name in SPLIT_NAMES}
            if any(len(v) and v.max() >= len(self.dataset) for v in self.indices.values()):
                raise DataError(f"{path}: the recorded split names records it does not have")
        else:
            groups = self.dataset.groups()
            if cfg.data.split_file is not None:
                self.indices = read_split_file(cfg.data.split_file, self.dataset)
            else:
                self.indices = split_by_group(groups, cfg.data.split, cfg.data.split_seed)
            train = self.indices["train"]
            self.indices["train"] = train_subset(
                train, groups[train], cfg.data.train_fraction, cfg.data.split_seed
            )
        if len(self.indices["train"]) == 0:
            raise DataError(f"{path}: the train split is empty")
        self.n_atoms = self.dataset.sizes("n_atoms")
        self.n_edges = None
        if cfg.data.max_edges is not None:
            if self.dataset.manifest.get("cutoff") != cfg.model.cutoff:
                raise DataError(
                    f"data.max_edges needs edge counts at cutoff {cfg.model.cutoff}; "
                    f"{path} has them for {self.dataset.manifest.get('cutoff')}. "
                    "Preprocess with --cutoff or set data.max_edges=null"
                )
            self.n_edges = self.dataset.sizes("n_edges")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size

    def sampler(self, split: str, shuffle: bool, limit: int = 0) -> BudgetBatchSampler:
        """This data-parallel rank's batches of ``split``: training batches dealt out in
        equal numbers, the others every structure once; ``limit`` > 0 keeps a fixed seeded
        subset of that many structures, in order."""
        idx = self.indices[split]
        if 0 < limit < len(idx):
            keep = np.random.default_rng([self.cfg.train.seed, limit]).permutation(len(idx))
            idx = idx[np.sort(keep[:limit])]
        return BudgetBatchSampler(
            idx,
            self.n_atoms[idx],
            self.cfg.data.max_atoms,
            None if self.n_edges is None else self.n_edges[idx],
            self.cfg.data.max_edges,
            shuffle=shuffle,
            seed=self.cfg.train.seed,
            rank=self.rank,
            world_size=self.world_size,
            drop_last=split == "train",
        )

    def unknown_elements(self, split: str, known: set[int] | None) -> tuple[set[int], int]:
        """The elements of ``split`` outside ``known`` and how many of its structures hold
        one (one pass over the split's atomic numbers, shard by shard)."""
        if known is None:
            return set(), 0
        idx = np.sort(self.indices[split])
        allowed = np.zeros(256, dtype=bool)
        allowed[list(known)] = True
        unknown, count = set(), 0
        for local, a in self.dataset.read_selected(idx, ["atomic_numbers", "atom_offsets"]):
            z, offsets = a["atomic_numbers"].astype(np.int64), a["atom_offsets"]
            bad = ~allowed[z]
            if not bad.any():
                continue
            per_structure = np.add.reduceat(bad, offsets[:-1]) if len(z) else bad
            sizes = np.diff(offsets)
            per_structure = np.where(sizes > 0, per_structure, 0)[local]
            count += int((per_structure > 0).sum())
            chosen = np.zeros(len(sizes), dtype=bool)
            chosen[local] = True
            unknown |= set(np.unique(z[bad & np.repeat(chosen, sizes)]).tolist())
        return unknown, count

    def statistics(self) -> dict:
        """Normalisation statistics of the training split (one streaming pass)."""
        return training_statistics(
            self.dataset, self.indices["train"], self.cfg.model.cutoff, self.cfg.data.split_seed
        )


def read_split_file(path: str | Path, dataset: ShardedDataset) -> dict[str, np.ndarray]:
    """The split an .npz gives (``data.split_file``): arrays ``train``, ``val`` and ``test``
    of record indices or record ids; each must name distinct records of ``dataset``."""
    try:
        with np.load(path) as f:
            given = {name: f[name] for name in SPLIT_NAMES}
    except (OSError, ValueError) as e:
        raise DataError(f"data.split_file {path}: not a readable .npz ({e})") from e
    except KeyError as e:
        raise DataError(f"data.split_file {path}: needs arrays {', '.join(SPLIT_NAMES)}") from e
    ids = None
    out = {}
    for name, values in given.items():
        values = np.asarray(values).reshape(-1)
        if values.dtype.kind in "US":
            if ids is None:
                ids = dataset.record_ids()
                order = np.argsort(ids, kind="stable")
                ordered = ids[order]
            values = values.astype(str)
            pos = np.minimum(np.searchsorted(ordered, values), len(ids) - 1)
            found = ordered[pos] == values
            if not found.all():
                raise DataError(
                    f"data.split_file {path}: {name} names record ids {dataset.root} does "
                    f"not have, e.g. {values[~found][:3].tolist()}"
                )
            values = order[pos]
        elif values.dtype.kind not in "iu":
            raise DataError(f"data.split_file {path}: {name} holds {values.dtype}, not indices")
        values = values.astype(np.int64)
        if len(values) and (values.min() < 0 or values.max() >= len(dataset)):
            raise DataError(f"data.split_file {path}: {name} indices outside 0..{len(dataset) - 1}")
        out[name] = np.sort(values)
    everything = np.concatenate(list(out.values()))
    if len(np.unique(everything)) != len(everything):
        raise DataError(f"data.split_file {path}: a record is listed twice (in one or two splits)")
    return out


def run_statistics(sources: list[Source]) -> dict:
    """Each dataset's training statistics and the neighbour normaliser pooled over all."""
    per_dataset = [
        {"path": str(s.data.path), "head": s.name, **s.data.statistics()} for s in sources
    ]
    return {"datasets": per_dataset, "avg_num_neighbors": pooled_avg_num_neighbors(per_dataset)}


def set_model_statistics(model: Potential, statistics: dict) -> None:
    """Reference energies and scale of each dataset's head (one dataset alone sets every
    head) and the shared neighbour normaliser, from ``run_statistics``."""
    heads = list(model.cfg.heads)
    entries = statistics["datasets"]
    for entry in entries:
        energies = {int(z): e for z, e in entry["atomic_energies"].items()}
        targets = range(len(heads)) if len(entries) == 1 else [heads.index(entry["head"])]
        for h in targets:
            model.set_statistics(
                h, energies, scale_of(entry), statistics["avg_num_neighbors"], entry.get("elements")
            )


def split_arrays(sources: list[Source]) -> dict[str, np.ndarray]:
    """The run's splits as splits.npz stores them: ``train``/``val``/``test`` for one dataset,
    ``<head>/<split>`` for several."""
    out = {}
    for s in sources:
        prefix = f"{s.name}/" if len(sources) > 1 else ""
        out.update({prefix + name: s.data.indices[name] for name in SPLIT_NAMES})
    return out


def recorded_run(path: str | Path) -> Path | None:
    """The run folder holding the split a checkpoint was trained with: ``path`` itself, or
    the run above a checkpoint folder (None for runs that predate splits.npz)."""
    for folder in [Path(path), *Path(path).resolve().parents[:2]]:
        if (folder / SPLITS).is_file():
            return folder
    return None


def read_splits(run_dir: str | Path, head: str | None = None) -> dict[str, np.ndarray] | None:
    """One dataset's recorded split from a run folder's splits.npz (``head`` for a
    multi-dataset run), or None if the run has none."""
    path = Path(run_dir) / SPLITS
    if not path.is_file():
        return None
    with np.load(path) as f:
        prefix = f"{head}/" if head is not None and f"{head}/train" in f else ""
        return {name: f[prefix + name] for name in SPLIT_NAMES}


class Source:
    """One training dataset of a run: its splits, head, sampling weight and position."""

    def __init__(self, cfg: Config, path: str, head: int, weight: float, rank: int, world: int):
        self.name, self.head, self.weight = cfg.model.heads[head], head, weight
        self.data = DataSplits(cfg, rank=rank, world_size=world, path=path, head=head)
        self.sampler = self.data.sampler("train", shuffle=True)
        self.epoch, self.batch_in_epoch = 0, 0
        self.num_workers = cfg.data.num_workers

    def batches(self):
        """Training batches forever, epoch after epoch, tracking the position for resume."""
        while True:
            for batch in iterate_batches(
                self.data.graphs, self.sampler, self.epoch, self.batch_in_epoch, self.num_workers
            ):
                self.batch_in_epoch += 1
                yield batch
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0


def dataset_entries(cfg: Config) -> list[tuple[str, int, float]]:
    """(path, head index, weight) of the run's datasets: data.datasets, or data.path on the
    first head."""
    if not cfg.data.datasets:
        return [(cfg.data.path, 0, 1.0)]
    return [(d.path, cfg.model.heads.index(d.head), d.weight) for d in cfg.data.datasets]


def label_plan(cfg: Config, sources: list[Source]) -> tuple[bool, bool, list[str]]:
    """Whether the run computes forces and stress while it trains, from the labels its
    datasets' manifests say they hold, and a note per thing switched off. Energy-only data
    (QM9) trains on energies alone: a conservative model's forces would cost a derivative
    per step and feed a loss term that is always empty. Direct forces without force labels
    are refused: their head would never train."""
    has = {
        key: any(s.data.dataset.manifest.get(key, True) for s in sources)
        for key in ("has_forces", "has_stress")
    }
    forces = cfg.model.forces != "none" and has["has_forces"]
    stress = cfg.model.stress and forces and has["has_stress"]
    notes = []
    paths = ", ".join(str(s.data.path) for s in sources)
    if cfg.model.forces == "direct" and not has["has_forces"]:
        raise ConfigError(
            f"model.forces=direct trains a force head on force labels, and {paths} holds "
            "none: set model.forces=none (or conservative, whose forces come from the energy)"
        )
    if cfg.model.forces == "conservative" and not forces:
        notes.append(
            f"{paths} holds no forces: training fits energies only, without the force "
            "derivative (loss.force_weight unused; the model still predicts conservative "
            "forces; model.forces=none says so and silences this)"
        )
    elif cfg.model.stress and forces and not stress:
        notes.append(
            f"{paths} holds no stress: training skips the strain derivative (model.stress="
            "false silences this)"
        )
    return forces, stress, notes


def data_sources(cfg: Config, rank: int = 0, world: int = 1) -> list[Source]:
    """The run's training datasets, each with its sampler for this data-parallel rank."""
    return [Source(cfg, path, head, w, rank, world) for path, head, w in dataset_entries(cfg)]


def config_changes(saved: object, now: object, prefix: str, ignore: tuple = ()) -> list[str]:
    """'prefix.field: old -> new' for every field of two config dataclasses that differs."""
    return [
        f"{prefix}.{f.name}: {getattr(saved, f.name)!r} -> {getattr(now, f.name)!r}"
        for f in dataclasses.fields(now)
        if f.name not in ignore and getattr(saved, f.name) != getattr(now, f.name)
    ]
