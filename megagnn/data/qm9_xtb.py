"""Forces on many distinct molecules: GFN1-xTB (tblite) energies and forces on QM9
geometries, two structures per molecule.

The G2-based xTB set (megagnn.data.xtb) holds about 130 distinct molecules, which flattens
a model-size axis: bigger models have no new chemistry to learn. QM9 (130,831 molecules,
read from the installed qm9pack) supplies the chemistry; GFN1-xTB, which runs here, supplies
forces. Each chosen molecule gives:
- a rattled conformer: Gaussian displacements for 300, 800 or 1500 K (drawn per molecule);
- the last frame of a short Langevin trajectory at that temperature (MD_STEPS steps of
  0.5 fs from the QM9 geometry, a B3LYP minimum and so near GFN1-xTB's).
Both share the molecule's group, ``qm9-<Index>`` (the QM9 reader's), so a split never puts
one in training and the other in test, and a molecule's xTB and DFT records group alike.
Record ids: ``qm9-<Index>-rattled`` and ``qm9-<Index>-md``. Molecules come in a seeded order
of all of QM9, CHUNK at a time, until N structures are kept: rejected draws (atoms too
close, SCF failure, force above 50 eV/Å) are left out, counted in the progress bar and made
up by further molecules. Chunk k holds molecules k·CHUNK ... of that order and is seeded by
(seed, k), whatever N, so any number of ``--workers`` writes the same file and a larger N
extends a smaller one.

    python tools/generate_qm9_xtb_data.py -o data/qm9xtb/raw.extxyz -n 20000 --workers 2

Finished chunks are kept in ``OUT.chunks/`` as they complete, so a run that is stopped
(20,000 structures from 10,925 molecules took about 40 core-minutes) resumes where it was
by running the same command again; the folder is removed once the file is written.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from ase import Atoms
from tqdm import tqdm

from megagnn.data.formats import qm9
from megagnn.data.shards import atomic_write_text, generate_extxyz_main
from megagnn.data.xtb import (
    TEMPERATURES,
    amplitude,
    calculator,
    from_text,
    in_order,
    labelled,
    md_frames,
    to_text,
)

PER_MOLECULE = 2  # a rattled conformer and an MD frame
CHUNK = 25  # molecules per chunk (the unit of work of one worker)
MD_STEPS = 10
# covalent radii are single-bond radii: 0.85 x their sum (the G2 set's filter) is 1.25 Å for
# C-C and rejects every alkyne and nitrile of QM9 at its own equilibrium (C#C 1.20 Å, C#N
# 1.16 Å); 0.7 keeps them and still catches fused atoms
MIN_BOND = 0.7


def ordered_molecules(seed: int, files: list[str] | None = None) -> list[tuple]:
    """Every QM9 molecule as (Index, atomic numbers, positions), in an order drawn by
    ``seed``: the first n of it are a random choice of n, for any n."""
    molecules = [
        (int(a.info["id"]), a.numbers.copy(), a.positions.copy())
        for path in files or qm9.installed_files()
        for a in qm9.read(path)
    ]
    return [molecules[i] for i in np.random.default_rng(seed).permutation(len(molecules))]


def generate_chunk(seed: int, chunk: int, molecules: list[tuple]) -> tuple[list[Atoms], int]:
    """The labelled structures of ``molecules`` (chunk ``chunk``, seeded by (seed, chunk)
    alone) and the number of draws rejected."""
    rng = np.random.default_rng([seed, chunk])
    calc = calculator()
    out: list[Atoms] = []
    failed = 0
    for index, numbers, positions in molecules:
        group = f"qm9-{index}"
        atoms = Atoms(numbers=numbers, positions=positions, pbc=False)
        temperature = float(rng.choice(TEMPERATURES))
        rattled = atoms.copy()
        rattled.positions += rng.normal(0, amplitude(temperature), positions.shape)
        draws = [labelled(rattled, calc, group, MIN_BOND)]
        draws += md_frames(atoms, calc, temperature, rng, group, 1, MD_STEPS, MIN_BOND)
        for kind, result in zip(("rattled", "md"), draws + [None], strict=False):
            if result is None:
                failed += 1
                continue
            result.info.update(id=f"{group}-{kind}", temperature=temperature)
            out.append(result)
    return out, failed


def _chunk_text(args: tuple[int, int, list[tuple], Path | None]) -> tuple[str, int, int]:
    """One chunk as extxyz text, its rejected draws and its molecule count; with a cache
    folder, read from there when an earlier run finished it, else kept there once done."""
    seed, chunk, molecules, cache = args
    kept = cache / f"chunk-{chunk:05d}.json" if cache is not None else None
    if kept is not None and kept.is_file():
        saved = json.loads(kept.read_text())
        return saved["text"], saved["failed"], len(molecules)
    structures, failed = generate_chunk(seed, chunk, molecules)
    text = to_text(structures)
    if kept is not None:  # written whole, then renamed: a killed run leaves no half chunk
        atomic_write_text(kept, json.dumps({"text": text, "failed": failed}))
    return text, failed, len(molecules)


def generate(
    n: int,
    seed: int = 0,
    progress: bool = True,
    workers: int = 1,
    files: list[str] | None = None,
    cache: str | Path | None = None,
) -> Iterator[Atoms]:
    """Yield ``n`` labelled structures (fewer only if QM9 runs out), chunk by chunk of the
    seeded molecule order until ``n`` are kept; the same for any ``workers``. ``cache``: a
    folder that keeps every finished chunk, so that a run that was stopped, or one asking
    for more, resumes there (chunks depend on ``seed`` alone: a subfolder holds each)."""
    molecules = ordered_molecules(seed, files)
    if cache is not None:
        cache = Path(cache) / f"seed{seed}"
        cache.mkdir(parents=True, exist_ok=True)
    tasks = (  # lazily: how many chunks n needs depends on the rejected draws
        (seed, k, molecules[start : start + CHUNK], cache)
        for k, start in enumerate(range(0, len(molecules), CHUNK))
    )
    bar = tqdm(total=n, desc="GFN1-xTB on QM9", unit=" structures", disable=not progress)
    failed = written = used = 0
    results = in_order(_chunk_text, tasks, workers)
    try:
        for text, bad, done in results:
            failed, used = failed + bad, used + done
            for atoms in itertools.islice(from_text(text), n - written):
                written += 1
                yield atoms
                bar.update()
            bar.set_postfix(molecules=used, rejected=failed)
            if written == n:
                break
    finally:
        results.close()  # ends the worker pool even when the caller stops early
        bar.close()


def main(argv: list[str] | None = None) -> int:
    return generate_extxyz_main(
        argv,
        generate,
        description="Generate GFN1-xTB (tblite) energies and forces on QM9 geometries: a "
        "rattled conformer and a short-MD frame per molecule (300/800/1500 K), from QM9's "
        "molecules (the installed qm9pack) in a seeded order until N are kept, one group "
        "per molecule.",
        default_num=20000,
        noun="structures",
        parallel=True,
        resumable=True,
    )
