"""Sharded HDF5 storage of atomistic structures, and the dataset.json manifest.

A shard holds contiguous arrays so that one read fetches a whole batch:
    atomic_numbers  [n_atoms_total] uint8
    positions       [n_atoms_total, 3] float64 Å
    forces          [n_atoms_total, 3] float64 eV/Å (NaN where a structure has none; absent
                    when no structure of the shard has forces)
    atom_offsets    [S + 1] int64, atoms of structure s are offsets[s]:offsets[s+1]
    cell            [S, 3, 3] float64 Å
    pbc             [S, 3] bool
    energy          [S] float64 eV (NaN where a structure has none)
    stress          [S, 3, 3] float64 eV/Å^3 (NaN where a structure has none; absent when none
                    has stress)
    group_hash      [S] uint64, hash of the structure's group id (megagnn.data.splits)
    record_id       [S] str, the record's id in its source (QM9's index, an MPtrj frame id;
                    else "<file>#<index>"); absent in shards written before ids were kept
    charge, spin    [S] float64 total charge (e) and spin multiplicity where the source gives
                    them (NaN where a structure has none; absent when none has them)
    n_edges         [S] int64, directed edges within manifest["cutoff"] (if preprocessed with one)

The manifest describes the data (counts, elements, labels present) but fits nothing to it:
reference energies and scales come from a run's training split (megagnn.data.statistics).

A shard is written under a temporary name and renamed when complete, and the manifest is
written last the same way, so a crash never leaves files that look complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

FORMAT_VERSION = 2
MAX_Z = 118
READABLE_VERSIONS = (1, 2)  # 1: no group_hash (each structure its own group)
# datasets a shard may leave out: labels no structure of it has, ids of older shards
OPTIONAL = ("forces", "stress", "record_id", "charge", "spin")
MANIFEST = "dataset.json"


class DataError(ValueError):
    """Bad input data; the message names the file and record."""


@dataclass
class Structure:
    """One validated structure, in the units of the shard format."""

    atomic_numbers: np.ndarray  # [n] int
    positions: np.ndarray  # [n, 3] float64 Å
    cell: np.ndarray  # [3, 3] float64 Å
    pbc: np.ndarray  # [3] bool
    energy: float | None  # eV (None: unlabelled, stored as NaN)
    forces: np.ndarray | None = None  # [n, 3] eV/Å
    stress: np.ndarray | None = None  # [3, 3] eV/Å^3
    group: str | None = None  # near-duplicates (one MD trajectory, one parent) share one
    record_id: str | None = None  # the record's id in its source (default "<file>#<index>")
    charge: int | None = None  # total charge (e), where the source gives it (OMol25)
    spin: int | None = None  # spin multiplicity 2S+1, where the source gives it (OMol25)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write under a temporary name, then rename: readers see the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2))


def atomic_write_extxyz(path: str | Path, structures: Iterable) -> int:
    """Write ASE structures (with their single-point results) to an extxyz file under a
    temporary name, renamed at the end: a partial file never carries the final name.
    Returns the number written."""
    import ase.io

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with open(tmp, "w") as f:
        for atoms in structures:
            ase.io.write(f, atoms, format="extxyz")
            count += 1
    os.replace(tmp, path)
    return count


class ShardWriter:
    """Writes structures into HDF5 shards of at most ``shard_size`` structures.

    ``prefix`` names the shards (``<prefix>-00000.h5``, ...), so several writers (the chunks
    of a parallel preprocessing) can share a folder. ``summary()`` describes what was written;
    ``close()`` also writes the manifest. As a context manager the manifest is written only
    if no error escaped, so an interrupted run leaves no ``dataset.json`` and no
    complete-looking shard.
    """

    def __init__(
        self,
        out_dir: str | Path,
        shard_size: int = 10000,
        cutoff: float | None = None,
        metadata: dict | None = None,
        prefix: str = "shard",
    ):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if (self.out_dir / MANIFEST).exists():
            raise DataError(f"{self.out_dir} already holds a dataset; choose an empty folder")
        self.shard_size = shard_size
        self.cutoff = cutoff
        self.metadata = metadata or {}
        self.prefix = prefix
        self.buffer: list[Structure] = []
        self.shards: list[dict] = []
        self.count = 0
        self.elements = np.zeros(MAX_Z + 1, dtype=bool)
        self.has_energy = False
        self.has_forces = False
        self.has_stress = False

    def add(self, s: Structure) -> None:
        if s.group is None:  # no group given: the structure is its own group
            s.group = f"{self.prefix}#{self.count}"
        if s.record_id is None:
            s.record_id = f"{self.prefix}#{self.count}"
        self.buffer.append(s)
        self.count += 1
        if len(self.buffer) >= self.shard_size:
            self._flush()

    def _flush(self) -> None:
        if not self.buffer:
            return
        from megagnn.data.neighbors import neighbor_list
        from megagnn.data.splits import group_hash

        name = f"{self.prefix}-{len(self.shards):05d}.h5"
        tmp = self.out_dir / (name + ".tmp")
        structs, self.buffer = self.buffer, []
        counts = np.array([len(s.atomic_numbers) for s in structs])
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        numbers = np.concatenate([s.atomic_numbers for s in structs])
        nan3 = np.full((3, 3), np.nan)
        with h5py.File(tmp, "w") as f:
            f["atomic_numbers"] = numbers.astype(np.uint8)
            f["positions"] = np.concatenate([s.positions for s in structs])
            if any(s.forces is not None for s in structs):  # else absent, not NaN-filled
                f["forces"] = np.concatenate(
                    [
                        s.forces if s.forces is not None else np.full((len(s.positions), 3), np.nan)
                        for s in structs
                    ]
                )
            f["atom_offsets"] = offsets
            f["cell"] = np.stack([s.cell for s in structs])
            f["pbc"] = np.stack([s.pbc for s in structs])
            f["energy"] = np.array([np.nan if s.energy is None else s.energy for s in structs])
            if any(s.stress is not None for s in structs):
                f["stress"] = np.stack(
                    [s.stress if s.stress is not None else nan3 for s in structs]
                )
            f["group_hash"] = np.array([group_hash(s.group) for s in structs], dtype=np.uint64)
            for key in ("charge", "spin"):
                values = [getattr(s, key) for s in structs]
                if any(v is not None for v in values):
                    f[key] = np.array([np.nan if v is None else v for v in values], np.float64)
            f.create_dataset(
                "record_id",
                data=[s.record_id for s in structs],
                dtype=h5py.string_dtype(),
            )
            if self.cutoff is not None:
                f["n_edges"] = np.array(
                    [
                        neighbor_list(s.positions, s.cell, s.pbc, self.cutoff)[0].shape[1]
                        for s in structs
                    ],
                    dtype=np.int64,
                )
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["n_structures"] = len(structs)
        os.replace(tmp, self.out_dir / name)
        self.elements[numbers] = True
        self.has_energy |= any(s.energy is not None for s in structs)
        self.has_forces |= any(s.forces is not None for s in structs)
        self.has_stress |= any(s.stress is not None for s in structs)
        self.shards.append(
            {"file": name, "n_structures": len(structs), "n_atoms": int(offsets[-1])}
        )

    def summary(self) -> dict:
        """Flush, then describe the shards written (the input of ``write_manifest``)."""
        self._flush()
        return {
            "shards": self.shards,
            "elements": np.flatnonzero(self.elements).tolist(),
            "has_energy": self.has_energy,
            "has_forces": self.has_forces,
            "has_stress": self.has_stress,
        }

    def close(self) -> dict:
        return write_manifest(self.out_dir, [self.summary()], self.cutoff, self.metadata)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


def write_manifest(
    out_dir: str | Path, summaries: list[dict], cutoff: float | None, metadata: dict
) -> dict:
    """Join the summaries of one or more writers, in dataset order, into ``dataset.json``
    (written last and atomically: its presence marks the dataset complete)."""
    shards = [shard for s in summaries for shard in s["shards"]]
    if not shards:
        raise DataError("no valid structures to write")
    manifest = {
        "format_version": FORMAT_VERSION,
        "units": {"energy": "eV", "length": "Å", "forces": "eV/Å", "stress": "eV/Å^3"},
        "n_structures": sum(s["n_structures"] for s in shards),
        "n_atoms": sum(s["n_atoms"] for s in shards),
        "shards": shards,
        "cutoff": cutoff,
        "elements": sorted(set().union(*(s["elements"] for s in summaries))),
        "has_energy": any(s.get("has_energy", True) for s in summaries),
        "has_forces": any(s["has_forces"] for s in summaries),
        "has_stress": any(s["has_stress"] for s in summaries),
        **metadata,
    }
    atomic_write_json(Path(out_dir) / MANIFEST, manifest)
    return manifest


def generate_extxyz_main(
    argv: list[str] | None,
    generate,
    *,
    description: str,
    default_num: int,
    noun: str,
    parallel: bool = False,
    resumable: bool = False,
) -> int:
    """The command line of a reference-data generator: ``generate(n, seed, progress=...)``
    (and ``workers=`` if ``parallel``, ``cache=`` if ``resumable``: a folder beside
    ``--out`` where finished work survives a stopped run) yields labelled structures,
    written atomically to ``--out`` as extxyz."""
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument("-o", "--out", required=True, help="output .extxyz file")
    p.add_argument("-n", "--num", type=int, default=default_num, help=f"number of {noun}")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    if parallel:
        p.add_argument(
            "--workers", type=int, default=1, help="worker processes (same data for any count)"
        )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = p.parse_args(argv)
    extra = {"workers": args.workers} if parallel else {}
    if resumable:
        extra["cache"] = Path(args.out + ".chunks")
    structures = generate(args.num, args.seed, progress=not args.no_progress, **extra)
    count = atomic_write_extxyz(args.out, structures)
    if resumable:
        shutil.rmtree(extra["cache"], ignore_errors=True)
    print(f"wrote {count} {noun} to {args.out}")
    return 0


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    file = path / MANIFEST if path.is_dir() else path
    if not file.is_file():
        raise DataError(
            f"{file} not found: {path} is not a preprocessed dataset (or its preprocessing "
            "did not finish); run tools/preprocess_data.py"
        )
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{file} is corrupt: {e}") from e
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise DataError(
            f"{file}: format_version {manifest.get('format_version')} is not one of "
            f"{READABLE_VERSIONS}; preprocess the data again"
        )
    for shard in manifest["shards"]:
        if not (file.parent / shard["file"]).is_file():
            raise DataError(f"{file.parent / shard['file']} listed in {file} is missing")
    return manifest


class ShardedDataset:
    """Lazy random access to the structures of a preprocessed dataset.

    HDF5 handles are opened on first use in each process (so DataLoader workers each get
    their own) and only the shards an index touches are ever opened. At most ``max_open``
    stay open (least recently used closed first): each open file holds HDF5 chunk caches,
    so without a bound a rank's memory would grow with the number of shards it visits.
    """

    def __init__(self, path: str | Path, max_open: int = 16):
        self.max_open = max(1, max_open)
        self.root = Path(path)
        self.manifest = read_manifest(self.root)
        counts = [s["n_structures"] for s in self.manifest["shards"]]
        self.shard_starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._files: dict[int, h5py.File] = {}
        self._offsets: dict[int, np.ndarray] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self.shard_starts[-1])

    def _file(self, k: int) -> h5py.File:
        if self._pid != os.getpid():  # forked into a worker: never share handles
            self._files, self._offsets, self._pid = {}, {}, os.getpid()
        if k in self._files:
            self._files[k] = self._files.pop(k)  # most recently used last
            return self._files[k]
        while len(self._files) >= self.max_open:
            oldest = next(iter(self._files))
            self._files.pop(oldest).close()
            self._offsets.pop(oldest, None)
        path = self.root / self.manifest["shards"][k]["file"]
        try:
            self._files[k] = h5py.File(path, "r")
        except OSError as e:
            raise DataError(f"cannot read shard {path}: {e}") from e
        return self._files[k]

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"structure {index} out of range (dataset has {len(self)})")
        k = int(np.searchsorted(self.shard_starts, index, side="right") - 1)
        return k, index - int(self.shard_starts[k])

    def shard_offsets(self, k: int) -> np.ndarray:
        if k not in self._offsets:
            self._offsets[k] = self._file(k)["atom_offsets"][:]
        return self._offsets[k]

    def sizes(self, key: str = "n_atoms") -> np.ndarray:
        """Atoms (or edges, key='n_edges') of every structure, for budget batching."""
        out = []
        for k in range(len(self.manifest["shards"])):
            if key == "n_atoms":  # read, not cached: offsets stay cached for open shards only
                out.append(np.diff(self._file(k)["atom_offsets"][:]))
            else:
                if key not in self._file(k):
                    raise DataError(f"{self.root}: shards have no {key}; preprocess with --cutoff")
                out.append(self._file(k)[key][:])
        return np.concatenate(out).astype(np.int64)

    def groups(self) -> np.ndarray:
        """Group hash of every structure [S] uint64 (megagnn.data.splits). Datasets written
        before groups existed (format 1) make each structure its own group."""
        out = []
        for k, shard in enumerate(self.manifest["shards"]):
            f = self._file(k)
            if "group_hash" in f:
                out.append(f["group_hash"][:].astype(np.uint64))
            else:
                start = self.shard_starts[k]
                out.append(np.arange(start, start + shard["n_structures"], dtype=np.uint64))
        return np.concatenate(out)

    def read_shard(self, k: int, keys: list[str]) -> dict[str, np.ndarray | None]:
        """Whole arrays of shard ``k`` (one contiguous read each; for streaming passes);
        None for an ``OPTIONAL`` key the shard does not hold."""
        f = self._file(k)
        try:
            return {key: f[key][:] if key in f or key not in OPTIONAL else None for key in keys}
        except (OSError, KeyError) as e:
            raise DataError(f"shard {f.filename} is corrupt or truncated: {e}") from e

    def record_ids(self) -> np.ndarray:
        """Every record's id [S] (str): its source's id, "<file>#<index>" as preprocessing
        named it, or (shards written before ids were kept) the dataset index."""
        out = []
        for k, shard in enumerate(self.manifest["shards"]):
            ids = self.read_shard(k, ["record_id"])["record_id"]
            if ids is None:
                start = int(self.shard_starts[k])
                ids = np.arange(start, start + shard["n_structures"]).astype(str)
            else:
                ids = np.array([i.decode() if isinstance(i, bytes) else i for i in ids])
            out.append(ids.astype(str))
        return np.concatenate(out)

    def read_selected(self, indices: np.ndarray, keys: list[str]):
        """For each shard holding some of the sorted record ``indices``: (their indices
        within the shard, the shard's whole ``keys`` arrays). One read per shard, for
        streaming passes over a split."""
        starts = self.shard_starts
        for k in np.unique(np.searchsorted(starts, indices, side="right") - 1):
            local = indices[(indices >= starts[k]) & (indices < starts[k + 1])] - starts[k]
            yield local, self.read_shard(int(k), keys)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        k, local = self._locate(int(index))
        f = self._file(k)
        a, b = self.shard_offsets(k)[local : local + 2]
        try:
            return {
                "atomic_numbers": f["atomic_numbers"][a:b].astype(np.int64),
                "positions": f["positions"][a:b],
                "forces": f["forces"][a:b] if "forces" in f else None,
                "cell": f["cell"][local],
                "pbc": f["pbc"][local],
                "energy": np.float64(f["energy"][local]),
                "stress": f["stress"][local] if "stress" in f else None,
                **{key: np.float64(f[key][local]) for key in ("charge", "spin") if key in f},
            }
        except (OSError, KeyError) as e:
            raise DataError(f"shard {f.filename} is corrupt or truncated: {e}") from e

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_files"] = {}
        return state
