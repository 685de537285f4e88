"""Atoms -> graphs: HDF5 shards, neighbour lists, budget batching."""

from megagnn.data.graph import atoms_to_graph, collate, structure_to_graph, to_device
from megagnn.data.shards import DataError, ShardedDataset, ShardWriter, Structure, read_manifest

__all__ = [
    "DataError",
    "ShardWriter",
    "ShardedDataset",
    "Structure",
    "atoms_to_graph",
    "collate",
    "read_manifest",
    "structure_to_graph",
    "to_device",
]
