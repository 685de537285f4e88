"""Sharded HDF5 storage of atomistic structures, and the dataset.json manifest.

A shard holds contiguous arrays so that one read fetches a whole batch:
    atomic_numbers  [n_atoms_total] uint8
    positions       [n_atoms_total, 3] float64 Å
    forces          [n_atoms_total, 3] float64 eV/Å (NaN where a structure has none)
    atom_offsets    [S + 1] int64, atoms of structure s are offsets[s]:offsets[s+1]
    cell            [S, 3, 3] float64 Å
    pbc             [S, 3] bool
    energy          [S] float64 eV
    stress          [S, 3, 3] float64 eV/Å^3 (NaN where a structure has none)
    n_edges         [S] int64, directed edges within manifest["cutoff"] (if preprocessed with one)

A shard is written under a temporary name and renamed when complete, and the manifest is
written last the same way, so a crash never leaves files that look complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

FORMAT_VERSION = 1
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
    energy: float  # eV
    forces: np.ndarray | None = None  # [n, 3] eV/Å
    stress: np.ndarray | None = None  # [3, 3] eV/Å^3


def atomic_write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


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


@dataclass
class _Stats:
    """One-pass statistics: least-squares reference energies and residual scales.

    Accumulates the normal equations of E_s ≈ Σ_z c_sz e_z, plus the moments needed to get
    the per-atom residual variance after solving, so memory does not grow with the data.
    """

    size: int = 119
    ata: np.ndarray = field(default_factory=lambda: np.zeros((119, 119)))
    atb: np.ndarray = field(default_factory=lambda: np.zeros(119))
    # moments of the per-atom residual (E - c.e) / n
    m_ee: float = 0.0
    m_ce: np.ndarray = field(default_factory=lambda: np.zeros(119))
    m_cc: np.ndarray = field(default_factory=lambda: np.zeros((119, 119)))
    n_structures: int = 0
    n_atoms: int = 0
    force_sq: float = 0.0
    force_count: int = 0
    n_edges: int = 0

    def add(self, s: Structure) -> None:
        c = np.bincount(s.atomic_numbers, minlength=self.size).astype(np.float64)
        n = len(s.atomic_numbers)
        self.ata += np.outer(c, c)
        self.atb += c * s.energy
        self.m_ee += (s.energy / n) ** 2
        self.m_ce += c * s.energy / n**2
        self.m_cc += np.outer(c, c) / n**2
        self.n_structures += 1
        self.n_atoms += n
        if s.forces is not None:
            self.force_sq += float((s.forces**2).sum())
            self.force_count += s.forces.size

    def finish(self) -> dict:
        present = np.flatnonzero(np.diag(self.ata) > 0)
        a = self.ata[np.ix_(present, present)]
        # a tiny ridge keeps collinear compositions (e.g. only one alloy ratio) solvable
        ridge = 1e-8 * np.trace(a) / max(len(present), 1)
        e = np.linalg.solve(a + ridge * np.eye(len(present)), self.atb[present])
        full = np.zeros(self.size)
        full[present] = e
        var = (self.m_ee - 2 * full @ self.m_ce + full @ self.m_cc @ full) / max(
            self.n_structures, 1
        )
        return {
            "elements": [int(z) for z in present],
            "atomic_energies": {str(int(z)): float(v) for z, v in zip(present, e, strict=True)},
            "energy_per_atom_residual_rms": float(np.sqrt(max(var, 0.0))),
            "force_rms": float(np.sqrt(self.force_sq / self.force_count))
            if self.force_count
            else None,
        }


class ShardWriter:
    """Writes structures into HDF5 shards of at most ``shard_size`` structures.

    Use as a context manager; the manifest is written by ``close()`` only if no error
    escaped, so an interrupted run leaves no ``dataset.json`` and no complete-looking shard.
    """

    def __init__(
        self,
        out_dir: str | Path,
        shard_size: int = 10000,
        cutoff: float | None = None,
        metadata: dict | None = None,
    ):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if (self.out_dir / MANIFEST).exists():
            raise DataError(f"{self.out_dir} already holds a dataset; choose an empty folder")
        self.shard_size = shard_size
        self.cutoff = cutoff
        self.metadata = metadata or {}
        self.buffer: list[Structure] = []
        self.shards: list[dict] = []
        self.stats = _Stats()
        self.has_forces = False
        self.has_stress = False

    def add(self, s: Structure) -> None:
        self.buffer.append(s)
        self.stats.add(s)
        if len(self.buffer) >= self.shard_size:
            self._flush()

    def _flush(self) -> None:
        if not self.buffer:
            return
        from megagnn.data.neighbors import neighbor_list

        name = f"shard-{len(self.shards):05d}.h5"
        tmp = self.out_dir / (name + ".tmp")
        structs, self.buffer = self.buffer, []
        counts = np.array([len(s.atomic_numbers) for s in structs])
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        nan3 = np.full((3, 3), np.nan)
        with h5py.File(tmp, "w") as f:
            f["atomic_numbers"] = np.concatenate([s.atomic_numbers for s in structs]).astype(
                np.uint8
            )
            f["positions"] = np.concatenate([s.positions for s in structs])
            f["forces"] = np.concatenate(
                [
                    s.forces if s.forces is not None else np.full((len(s.positions), 3), np.nan)
                    for s in structs
                ]
            )
            f["atom_offsets"] = offsets
            f["cell"] = np.stack([s.cell for s in structs])
            f["pbc"] = np.stack([s.pbc for s in structs])
            f["energy"] = np.array([s.energy for s in structs])
            f["stress"] = np.stack([s.stress if s.stress is not None else nan3 for s in structs])
            if self.cutoff is not None:
                n_edges = np.array(
                    [
                        neighbor_list(s.positions, s.cell, s.pbc, self.cutoff)[0].shape[1]
                        for s in structs
                    ],
                    dtype=np.int64,
                )
                f["n_edges"] = n_edges
                self.stats.n_edges += int(n_edges.sum())
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["n_structures"] = len(structs)
        os.replace(tmp, self.out_dir / name)
        self.has_forces |= any(s.forces is not None for s in structs)
        self.has_stress |= any(s.stress is not None for s in structs)
        self.shards.append(
            {"file": name, "n_structures": len(structs), "n_atoms": int(offsets[-1])}
        )

    def close(self) -> dict:
        self._flush()
        if not self.shards:
            raise DataError("no valid structures to write")
        manifest = {
            "format_version": FORMAT_VERSION,
            "units": {"energy": "eV", "length": "Å", "forces": "eV/Å", "stress": "eV/Å^3"},
            "n_structures": self.stats.n_structures,
            "n_atoms": self.stats.n_atoms,
            "shards": self.shards,
            "cutoff": self.cutoff,
            "avg_num_neighbors": self.stats.n_edges / self.stats.n_atoms
            if self.cutoff is not None
            else None,
            "has_forces": self.has_forces,
            "has_stress": self.has_stress,
            **self.stats.finish(),
            **self.metadata,
        }
        atomic_write_json(self.out_dir / MANIFEST, manifest)
        return manifest

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


def generate_extxyz_main(
    argv: list[str] | None, generate, *, description: str, default_num: int, noun: str
) -> int:
    """The command line of a reference-data generator: ``generate(n, seed, progress=...)``
    yields labelled structures, written atomically to ``--out`` as extxyz."""
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument("-o", "--out", required=True, help="output .extxyz file")
    p.add_argument("-n", "--num", type=int, default=default_num, help=f"number of {noun}")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = p.parse_args(argv)
    count = atomic_write_extxyz(
        args.out, generate(args.num, args.seed, progress=not args.no_progress)
    )
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
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{file}: format_version {manifest.get('format_version')} is not {FORMAT_VERSION}"
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

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        k, local = self._locate(int(index))
        f = self._file(k)
        a, b = self.shard_offsets(k)[local : local + 2]
        try:
            return {
                "atomic_numbers": f["atomic_numbers"][a:b].astype(np.int64),
                "positions": f["positions"][a:b],
                "forces": f["forces"][a:b],
                "cell": f["cell"][local],
                "pbc": f["pbc"][local],
                "energy": np.float64(f["energy"][local]),
                "stress": f["stress"][local],
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
