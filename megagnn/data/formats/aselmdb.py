"""ASE-LMDB (``*.aselmdb``): the format of OMat24, OMol25 and the current OC20/OC22
releases, an LMDB of ASE database rows, read with ``ase_db_backends.aselmdb.LMDBDatabase``
from the ``ase-db-backends`` package (what fairchem reads it with; ``pip install
"megagnn[lmdb]"``). Rows are ASE rows: their single-point results are already in eV, Å,
eV/Å and eV/Å³ (ASE's sign). A row's key-value pairs and data land in ``atoms.info``, so
``--group-key`` may name any of them; OMol25's total ``charge`` and ``spin`` are kept in the
record. Without a group, each row is its own. The record id is the row's ``sid`` where it
has one, else ``<file>#<row id>``. A file splits into chunks of consecutive rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from ase import Atoms

from megagnn.data.shards import DataError

SUFFIXES = (".aselmdb", ".lmdb")


def is_aselmdb(path: str) -> bool:
    return path.endswith(SUFFIXES)


def _open(path: str):
    try:
        from ase_db_backends.aselmdb import LMDBDatabase
    except ImportError as e:
        raise DataError(
            f"{path}: reading ASE-LMDB needs the ase-db-backends package: "
            'pip install "megagnn[lmdb]"'
        ) from e
    try:
        return LMDBDatabase(path, readonly=True, use_lock_file=False)
    except Exception as e:  # lmdb raises its own error types
        raise DataError(f"{path}: not a readable ASE-LMDB file ({type(e).__name__}: {e})") from e


def units(path: str) -> list[int]:
    """One record per row."""
    db = _open(path)
    try:
        return [1] * db.count()
    finally:
        db.close()


def read(path: str, span: tuple[int, int] | None = None) -> Iterator[Atoms]:
    """Rows ``span`` (all by default) of an ASE-LMDB file, in order."""
    db = _open(path)
    name = Path(path).name
    try:
        ids = list(db.ids)
        for row_id in ids[slice(*span) if span else slice(None)]:
            try:
                row = db.get(id=row_id)
                atoms = row.toatoms()
                info = dict(row.key_value_pairs)
                if isinstance(row.get("data"), dict):
                    info.update(row.data)
            except Exception as e:  # a damaged row: lmdb, zlib or json errors
                raise DataError(
                    f"{path}: row {row_id}: unreadable ({type(e).__name__}: {e})"
                ) from e
            atoms.info.update(info)
            atoms.info["id"] = str(info.get("sid", f"{name}#{row_id}"))
            yield atoms
    finally:
        db.close()
