"""ASE-readable files -> validated structures -> HDF5 shards + dataset.json.

The inputs are cut into *chunks* (a range of frames of an extxyz file, found by a fast scan
of its frame headers, or a whole file of another format), in dataset order. Each chunk is
validated and written to its own shards by one worker, so the work spreads over
``--workers`` processes on one machine, or over independent cluster jobs (``--part K/N``:
job K takes every N-th chunk and writes its own part file) joined by ``--merge``, which
writes the one manifest. Chunks never share state, so any split of the work gives the same
dataset, record for record.
"""

from __future__ import annotations

import argparse
import glob
import io
import itertools
import json
import multiprocessing
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import ase.io
import numpy as np
from ase import Atoms
from ase.stress import voigt_6_to_full_3x3_stress
from tqdm import tqdm

from megagnn.data.formats import aselmdb, molecules_h5, mptrj, qm7x, qm9
from megagnn.data.neighbors import neighbor_list
from megagnn.data.shards import (
    MANIFEST,
    DataError,
    ShardWriter,
    Structure,
    atomic_write_json,
    write_manifest,
)

EXTXYZ_SUFFIXES = (".xyz", ".extxyz")
FORMATS = ("auto", "ase", "qm9", "mptrj", "ani1x", "spice", "qm7x", "aselmdb")
"""--format: 'ase' (anything ase.io reads), 'qm9' (qm9pack's CSV files), 'mptrj' (its JSON),
'ani1x', 'spice' and 'qm7x' (their HDF5 files), 'aselmdb' (OMat24, OMol25, OC20;
megagnn.data.formats has a reader each) or 'auto' (each file by its extension and
content)."""
PARTS = "parts"


def _property(atoms: Atoms, name: str, key: str | None) -> np.ndarray | float | None:
    """A target from the attached calculator, or from atoms.info / atoms.arrays by key."""
    if key is not None:
        if key in atoms.info:
            return atoms.info[key]
        if key in atoms.arrays:
            return atoms.arrays[key]
    calc = atoms.calc
    if calc is not None and name in getattr(calc, "results", {}):
        return calc.results[name]
    return None


def to_structure(
    atoms: Atoms,
    min_distance: float = 0.5,
    energy_key: str = "energy",
    forces_key: str = "forces",
    stress_key: str = "stress",
    group: str | None = None,
    record_id: str | None = None,
) -> Structure:
    """Validate one ASE structure; raise DataError saying what is wrong."""
    n = len(atoms)
    if n == 0:
        raise DataError("structure has no atoms")
    z = atoms.get_atomic_numbers()
    if (z < 1).any() or (z > 118).any():
        raise DataError(f"atomic numbers out of range 1..118: {sorted(set(z.tolist()))}")
    pos = np.asarray(atoms.get_positions(), dtype=np.float64)
    if not np.isfinite(pos).all():
        raise DataError("positions contain NaN or inf")
    pbc = np.asarray(atoms.get_pbc(), dtype=bool)
    cell = np.asarray(atoms.get_cell()[:], dtype=np.float64)
    if not np.isfinite(cell).all():
        raise DataError("cell contains NaN or inf")
    if pbc.any():
        lengths = np.linalg.norm(cell, axis=1)
        if (lengths[pbc] < 1e-6).any():
            raise DataError(f"periodic direction with a zero cell vector (cell lengths {lengths})")
        if pbc.all() and abs(np.linalg.det(cell)) < 1e-6:
            raise DataError("periodic cell has zero volume")

    energy = _property(atoms, "energy", energy_key)
    if energy is not None:
        energy = float(np.asarray(energy).reshape(()))
        if not np.isfinite(energy):
            raise DataError(f"energy is {energy}")

    forces = _property(atoms, "forces", forces_key)
    if forces is not None:
        forces = np.asarray(forces, dtype=np.float64)
        if forces.shape != (n, 3):
            raise DataError(f"forces have shape {forces.shape}, expected ({n}, 3)")
        if not np.isfinite(forces).all():
            raise DataError("forces contain NaN or inf")

    stress = _property(atoms, "stress", stress_key)
    if stress is not None:
        stress = np.asarray(stress, dtype=np.float64)
        if stress.shape == (6,):
            stress = voigt_6_to_full_3x3_stress(stress)
        if stress.shape != (3, 3):
            raise DataError(f"stress has shape {stress.shape}, expected (6,) or (3, 3)")
        if not np.isfinite(stress).all():
            raise DataError("stress contains NaN or inf")
        if not pbc.all():
            stress = None  # stress is defined only for fully periodic cells

    if energy is None and forces is None and stress is None:
        raise DataError(
            f"no labels: no energy ({energy_key!r}), forces ({forces_key!r}) or stress "
            f"({stress_key!r}) in atoms.info/arrays or a calculator result; name the keys "
            "with --energy-key/--forces-key/--stress-key"
        )

    if min_distance > 0:  # periodic images count: a small cell can overlap itself
        edges, shifts = neighbor_list(pos, cell, pbc, min_distance)
        if edges.shape[1]:
            i, j = edges[1, 0], edges[0, 0]
            d = np.linalg.norm(pos[j] - pos[i] + shifts[0] @ cell)
            what = f"atom {i} and its periodic image" if i == j else f"atoms {i} and {j}"
            raise DataError(f"{what} overlap ({d:.3f} Å < {min_distance} Å)")

    charge, spin = (_integer(atoms.info.get(key), key) for key in ("charge", "spin"))
    return Structure(
        z.astype(np.int64), pos, cell, pbc, energy, forces, stress, group, record_id, charge, spin
    )


def _integer(value, name: str) -> int | None:
    """A total charge or spin multiplicity from atoms.info (OMol25 keeps them there)."""
    if value is None:
        return None
    number = float(np.asarray(value).reshape(()))
    if not number.is_integer():
        raise DataError(f"{name} {value!r} is not a whole number")
    return int(number)


def input_files(patterns: list[str]) -> list[str]:
    """The files matched by the patterns, in order (globs sorted)."""
    files: list[str] = []
    for p in patterns:
        matched = sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p]
        if not matched:
            raise DataError(f"no file matches {p!r}")
        for path in matched:
            if Path(path).is_dir():
                raise DataError(
                    f"{path} is a folder; give the files in it (e.g. '{path}/*.extxyz', "
                    "quoted so that the glob reaches megagnn)"
                )
            if not Path(path).is_file():
                raise DataError(f"input file {path} does not exist")
        files.extend(matched)
    return files


def extxyz_frames(path: str) -> list[int] | None:
    """Byte offset of every frame of an (ext)xyz file, plus the end of the last one; None if
    the file does not look like xyz (then it is read whole by ASE, which names the error)."""
    offsets, pos = [], 0
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                pos += len(line)
                continue
            try:
                n = int(line)
            except ValueError:
                return None
            offsets.append(pos)
            pos += len(line)
            body = list(itertools.islice(f, n + 1))  # comment line + atoms
            if len(body) < n + 1:
                return None  # truncated frame: let ASE report it
            pos += sum(len(b) for b in body)
    return offsets + [pos]


@dataclass(frozen=True)
class Chunk:
    """A slice of the inputs written by one worker: records [first, first + count) of
    ``file``, read by the reader of ``kind``: bytes [start, stop) of an extxyz file, or the
    file's units (HDF5 groups, LMDB rows) [span[0], span[1]); neither: the whole file."""

    index: int
    file: str
    first: int
    count: int | None
    start: int | None = None
    stop: int | None = None
    kind: str = "ase"
    span: tuple[int, int] | None = None


def plan_chunks(files: list[str], chunk_size: int, fmt: str = "auto") -> list[Chunk]:
    """Cut the input files into chunks of at most ``chunk_size`` records (a unit larger than
    that is a chunk alone), in dataset order."""
    chunks: list[Chunk] = []
    for path in files:
        kind = file_format(path, fmt)  # looks into the file once
        frames = extxyz_frames(path) if kind == "ase" and path.endswith(EXTXYZ_SUFFIXES) else None
        if frames is not None:
            for first in range(0, len(frames) - 1, chunk_size):
                last = min(first + chunk_size, len(frames) - 1)
                chunks.append(
                    Chunk(len(chunks), path, first, last - first, frames[first], frames[last])
                )
            continue
        sizes = unit_sizes(path, kind)
        if not sizes:
            chunks.append(Chunk(len(chunks), path, 0, None, kind=kind))
            continue
        begin = first = total = 0
        for k, size in enumerate(sizes):
            if total and total + size > chunk_size:
                chunks.append(Chunk(len(chunks), path, first, total, kind=kind, span=(begin, k)))
                begin, first, total = k, first + total, 0
            total += size
        chunks.append(Chunk(len(chunks), path, first, total, kind=kind, span=(begin, len(sizes))))
    return chunks


def file_format(path: str, fmt: str) -> str:
    """The reader of one input file under --format ``fmt``."""
    if fmt != "auto":
        return fmt
    for kind, detect in (
        ("qm9", qm9.is_qm9),
        ("aselmdb", aselmdb.is_aselmdb),
        ("mptrj", mptrj.is_mptrj),
        ("qm7x", qm7x.is_qm7x),
    ):
        if detect(path):
            return kind
    return molecules_h5.detect(path) or "ase"


def unit_sizes(path: str, kind: str) -> list[int] | None:
    """Records per unit that a chunk may start at (HDF5 groups, LMDB rows), or None: the
    file is read whole by one worker."""
    try:
        if kind in ("ani1x", "spice"):
            return molecules_h5.units(path, kind)
        if kind == "qm7x":
            return qm7x.units(path)
        if kind == "aselmdb":
            return aselmdb.units(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read as {kind} ({e})") from e
    return None


def _read_chunk(chunk: Chunk, kind: str, energy_key: str):
    """The chunk's structures, read by the reader of ``kind`` (``file_format``)."""
    if kind == "qm9":
        yield from qm9.read(chunk.file, energy_key)
        return
    if kind == "mptrj":
        yield from mptrj.read(chunk.file, energy_key)
        return
    if kind in ("ani1x", "spice"):
        yield from molecules_h5.read(chunk.file, kind, energy_key, chunk.span)
        return
    if kind == "qm7x":
        yield from qm7x.read(chunk.file, energy_key, chunk.span)
        return
    if kind == "aselmdb":
        yield from aselmdb.read(chunk.file, chunk.span)
        return
    try:
        if chunk.start is None:
            yield from ase.io.iread(chunk.file, index=":")
            return
        with open(chunk.file, "rb") as f:
            f.seek(chunk.start)
            text = f.read(chunk.stop - chunk.start).decode()
        yield from ase.io.iread(io.StringIO(text), index=":", format="extxyz")
    except DataError:
        raise
    except Exception as e:  # ASE raises many types for unreadable files
        raise DataError(f"{chunk.file}: cannot read ({type(e).__name__}: {e})") from e


@dataclass(frozen=True)
class Options:
    """What every chunk is written with (part files record it; --merge checks it)."""

    out_dir: str
    shard_size: int = 10000
    cutoff: float | None = None
    skip_invalid: bool = False
    min_distance: float = 0.5
    group_key: str = "group"
    energy_key: str = "energy"
    forces_key: str = "forces"
    stress_key: str = "stress"
    format: str = "auto"


def process_chunk(chunk: Chunk, opts: Options, progress: Callable[[], None] | None = None) -> dict:
    """Validate and write one chunk's shards; returns the writer's summary plus the chunk
    index, records read and the skipped records (file and index)."""
    writer = ShardWriter(
        opts.out_dir, opts.shard_size, opts.cutoff, prefix=f"shard-{chunk.index:05d}"
    )
    skipped: list[str] = []
    records = 0
    kind = chunk.kind
    # a format reader puts the energy it was asked for (--energy-key) under "energy"
    energy_key = opts.energy_key if kind in ("ase", "aselmdb") else "energy"
    for offset, atoms in enumerate(_read_chunk(chunk, kind, opts.energy_key)):
        index = chunk.first + offset
        records += 1
        group = atoms.info.get(opts.group_key)
        # without a group each structure is its own: named by file and index, so appending
        # files or records never renames an old structure's group
        where = f"{Path(chunk.file).name}#{index}"
        group = where if group is None else str(group)
        record_id = str(atoms.info.get("id", where))  # format readers set their own ids
        try:
            s = to_structure(
                atoms,
                min_distance=opts.min_distance,
                energy_key=energy_key,
                forces_key=opts.forces_key,
                stress_key=opts.stress_key,
                group=group,
                record_id=record_id,
            )
        except DataError as e:
            where = f"{chunk.file} record {index}: {e}"
            if not opts.skip_invalid:
                raise DataError(f"{where} (use --skip-invalid to drop bad records)") from e
            skipped.append(where)
            continue
        writer.add(s)
        if progress:
            progress()
    return {"chunk": chunk.index, "records": records, "skipped": skipped, **writer.summary()}


def _process(args: tuple[Chunk, Options]) -> dict:
    return process_chunk(*args)


def _run_chunks(chunks: list[Chunk], opts: Options, workers: int, progress: bool) -> list[dict]:
    bar = tqdm(
        total=sum(c.count or 0 for c in chunks) or None,
        desc="preprocess",
        unit=" structures",
        disable=not progress,
    )
    if workers <= 1:
        summaries = [process_chunk(c, opts, bar.update) for c in chunks]
    else:
        # spawn: no inherited h5py/torch state in the workers
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            summaries = []
            for summary in pool.imap(_process, [(c, opts) for c in chunks]):
                summaries.append(summary)
                bar.update(summary["records"])
    bar.close()
    return summaries


def _report_skipped(skipped: list[str]) -> None:
    for line in skipped[:20]:
        print(f"skipped: {line}", file=sys.stderr)
    if len(skipped) > 20:
        print(f"... and {len(skipped) - 20} more skipped records", file=sys.stderr)


def _finish(out_dir: Path, summaries: list[dict], opts: Options, sources: list[str]) -> dict:
    summaries = sorted(summaries, key=lambda s: s["chunk"])
    skipped = [line for s in summaries for line in s["skipped"]]
    metadata = {"sources": sources, "skipped": len(skipped), "group_key": opts.group_key}
    metadata["label_keys"] = {
        "energy": opts.energy_key,
        "forces": opts.forces_key,
        "stress": opts.stress_key,
    }
    manifest = write_manifest(out_dir, summaries, opts.cutoff, metadata)
    _report_skipped(skipped)
    return manifest


def preprocess(
    inputs: list[str],
    out_dir: str | Path,
    shard_size: int = 10000,
    cutoff: float | None = None,
    skip_invalid: bool = False,
    min_distance: float = 0.5,
    progress: bool = True,
    workers: int = 1,
    group_key: str = "group",
    part: tuple[int, int] | None = None,
    energy_key: str = "energy",
    forces_key: str = "forces",
    stress_key: str = "stress",
    format: str = "auto",
) -> dict:
    """Convert inputs (``format``: see FORMATS; QM9 with no inputs reads the installed
    qm9pack) into a sharded dataset; return its manifest.

    ``part=(k, n)`` writes only every n-th chunk from the k-th on, and a part file instead
    of the manifest; ``merge(out_dir)`` joins the n parts. Returns the part file's content
    then.
    """
    out_dir = Path(out_dir)
    if (out_dir / MANIFEST).exists():
        raise DataError(f"{out_dir} already holds a dataset; choose an empty folder")
    opts = Options(
        str(out_dir),
        shard_size,
        cutoff,
        skip_invalid,
        min_distance,
        group_key,
        energy_key,
        forces_key,
        stress_key,
        format,
    )
    if format not in FORMATS:
        raise DataError(f"--format {format!r}: use one of {', '.join(FORMATS)}")
    if format == "qm9" and not inputs:
        inputs = qm9.installed_files()
    files = input_files(inputs)
    chunks = plan_chunks(files, shard_size, format)
    if part is None:
        return _finish(out_dir, _run_chunks(chunks, opts, workers, progress), opts, inputs)
    k, n = part
    if not 0 <= k < n:
        raise DataError(f"--part {k}/{n}: K must lie in 0..N-1")
    mine = [c for c in chunks if c.index % n == k]
    summaries = _run_chunks(mine, opts, workers, progress)
    record = {
        "part": k,
        "parts": n,
        "chunks": len(chunks),
        "options": asdict(opts),
        "sources": inputs,
        "summaries": summaries,
    }
    (out_dir / PARTS).mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / PARTS / f"part-{k:05d}-of-{n:05d}.json", record)
    return record


def merge(out_dir: str | Path) -> dict:
    """Write the manifest of a dataset preprocessed as independent parts (``--part K/N``),
    once every part has finished; refuses missing or inconsistent parts."""
    out_dir = Path(out_dir)
    if (out_dir / MANIFEST).exists():
        raise DataError(f"{out_dir} already holds a dataset (merged already?)")
    files = sorted((out_dir / PARTS).glob("part-*-of-*.json"))
    if not files:
        raise DataError(f"{out_dir / PARTS} holds no part files; run --part K/N jobs first")
    parts = [json.loads(f.read_text()) for f in files]
    first = parts[0]
    n = first["parts"]
    for p in parts:
        for key in ("parts", "chunks", "options", "sources"):
            if p[key] != first[key]:
                raise DataError(
                    f"part {p['part']} was run with {key}={p[key]!r}, part {first['part']} "
                    f"with {first[key]!r}: rerun the parts with the same inputs and options"
                )
    missing = sorted(set(range(n)) - {p["part"] for p in parts})
    if missing:
        raise DataError(f"parts {missing} of {n} have not finished; run them, then merge")
    summaries = [s for p in parts for s in p["summaries"]]
    opts = Options(**first["options"])
    return _finish(out_dir, summaries, opts, first["sources"])


def _part(text: str) -> tuple[int, int]:
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: write it as K/N, e.g. 3/16") from e
    return k, n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Validate structures (anything ASE reads, or QM9, MPtrj, ANI-1x, SPICE, "
        "QM7-X and ASE-LMDB files) in eV and Å and write them "
        "as HDF5 shards plus a dataset.json manifest. Records sharing a group (--group-key) "
        "always land in the same train/val/test split. In parallel: --workers N on one "
        "machine; on a cluster, N independent jobs with --part K/N, then one --merge.",
    )
    p.add_argument("inputs", nargs="*", help="input files or glob patterns (quote globs)")
    p.add_argument("-o", "--out", required=True, help="output folder (must not hold a dataset)")
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="auto",
        help="input format: ase (anything ase.io reads), qm9 (the CSV files of the qm9pack "
        "wheel, read from the installed package when no inputs are given; --energy-key U0 "
        "(default), U, H or G), mptrj (MPtrj's JSON; --energy-key corrected (default) or "
        "uncorrected), ani1x, spice or qm7x (their HDF5 files; ani1x and qm7x: --energy-key "
        "picks the level), aselmdb (OMat24/OMol25/OC20 *.aselmdb, needs ase-db-backends), "
        "or auto: by each file's extension and content (default: %(default)s)",
    )
    p.add_argument("--shard-size", type=int, default=10000, help="structures per shard")
    p.add_argument(
        "--cutoff",
        type=float,
        default=None,
        help="also store edge counts for this cutoff (Å), enabling edge-budget batching",
    )
    p.add_argument(
        "--group-key",
        default="group",
        help="atoms.info key naming a record's group (MD trajectory, parent structure); "
        "records without it are each their own group (default: %(default)s)",
    )
    for label, unit in (("energy", "eV"), ("forces", "eV/Å"), ("stress", "eV/Å^3")):
        p.add_argument(
            f"--{label}-key",
            default=label,
            help=f"atoms.info/arrays key of the {label} ({unit}), e.g. REF_{label} for MACE-style "
            "files; without it, the attached calculator's result (default: %(default)s). A "
            "record may lack some labels (its loss terms are masked), not all",
        )
    p.add_argument(
        "--skip-invalid", action="store_true", help="drop and count bad records instead of failing"
    )
    p.add_argument(
        "--min-distance", type=float, default=0.5, help="reject atoms closer than this (Å)"
    )
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine")
    p.add_argument(
        "--part",
        type=_part,
        help="K/N: write only part K of N (an independent cluster job); then run --merge",
    )
    p.add_argument(
        "--merge", action="store_true", help="join the finished --part jobs into one manifest"
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = p.parse_args(argv)
    if args.merge and args.inputs or not (args.merge or args.inputs or args.format == "qm9"):
        p.error("give input files (--format qm9: or none, for the installed qm9pack), or --merge")
    try:
        if args.merge:
            m = merge(args.out)
        else:
            m = preprocess(
                args.inputs,
                args.out,
                shard_size=args.shard_size,
                cutoff=args.cutoff,
                skip_invalid=args.skip_invalid,
                min_distance=args.min_distance,
                progress=not args.no_progress,
                workers=args.workers,
                group_key=args.group_key,
                part=args.part,
                energy_key=args.energy_key,
                forces_key=args.forces_key,
                stress_key=args.stress_key,
                format=args.format,
            )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.part is not None:
        done = sum(len(s["shards"]) for s in m["summaries"])
        print(f"part {m['part']}/{m['parts']}: wrote {done} shard(s); run --merge when all end")
        return 0
    print(
        f"wrote {m['n_structures']} structures ({m['n_atoms']} atoms) in {len(m['shards'])} "
        f"shard(s) to {args.out}; skipped {m['skipped']}; elements {m['elements']}"
    )
    return 0
