"""A run's datasets: each one's seeded train/val/test split, graphs at the model's cutoff,
head, sampling weight and position in its epochs (multi-head pretraining reads several)."""

from __future__ import annotations

from megagnn import keys as K
from megagnn.config import Config
from megagnn.data.sampler import (
    BudgetBatchSampler,
    GraphDataset,
    iterate_batches,
    split_indices,
    train_subset,
)
from megagnn.data.shards import DataError, ShardedDataset
from megagnn.models import Potential


class DataSplits:
    """The dataset, its graphs at the model's cutoff and the seeded train/val/test split."""

    def __init__(
        self,
        cfg: Config,
        rank: int = 0,
        world_size: int = 1,
        path: str | None = None,
        head: int = 0,
    ):
        path = path or cfg.data.path
        self.dataset = ShardedDataset(path)
        self.graphs = GraphDataset(self.dataset, cfg.model.cutoff, head)
        self.indices = split_indices(len(self.dataset), cfg.data.split, cfg.data.split_seed)
        self.indices["train"] = train_subset(
            self.indices["train"], cfg.data.train_fraction, cfg.data.split_seed
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

    def sampler(self, split: str, shuffle: bool) -> BudgetBatchSampler:
        idx = self.indices[split]
        return BudgetBatchSampler(
            idx,
            self.n_atoms[idx],
            self.cfg.data.max_atoms,
            None if self.n_edges is None else self.n_edges[idx],
            self.cfg.data.max_edges,
            shuffle=shuffle,
            seed=self.cfg.train.seed,
            rank=self.rank if split == "train" else 0,
            world_size=self.world_size if split == "train" else 1,
        )

    def avg_num_neighbors(self, limit: int = 200) -> float:
        manifest = self.dataset.manifest
        if manifest.get("cutoff") == self.cfg.model.cutoff and manifest.get("avg_num_neighbors"):
            return float(manifest["avg_num_neighbors"])
        idx = self.indices["train"][:limit]
        edges = sum(self.graphs[int(i)][K.EDGE_INDEX].shape[1] for i in idx)
        return max(edges / max(int(self.n_atoms[idx].sum()), 1), 1.0)


def set_model_statistics(model: Potential, data: DataSplits, head: int | None = None) -> None:
    """Reference energies and scale of ``head`` (every head if None) from the dataset's
    manifest; the neighbour-count normaliser from the dataset too."""
    manifest = data.dataset.manifest
    scale = manifest.get("force_rms") or manifest.get("energy_per_atom_residual_rms") or 1.0
    energies = {int(z): e for z, e in manifest["atomic_energies"].items()}
    avg_neighbors = data.avg_num_neighbors()
    for h in range(len(model.cfg.heads)) if head is None else [head]:
        model.set_statistics(h, energies, max(scale, 1e-6), avg_neighbors)


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


def data_sources(cfg: Config, rank: int = 0, world: int = 1) -> list[Source]:
    """The run's training datasets, each with its sampler for this data-parallel rank."""
    return [Source(cfg, path, head, w, rank, world) for path, head, w in dataset_entries(cfg)]
