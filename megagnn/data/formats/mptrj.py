"""MPtrj (Deng et al., Nat. Mach. Intell. 2023; CHGNet's training set): 1.58M frames of
Materials Project relaxations, one JSON file (``MPtrj_2022.9_full.json``, ~12 GB):

    {mp_id: {frame_id: {"structure": <pymatgen Structure dict>,
                        "uncorrected_total_energy": eV, "corrected_total_energy": eV,
                        "force": [[eV/Å]], "stress": [[kBar]], "magmom": ...}}}

Read as a stream, one ``mp_id`` entry at a time, so memory stays flat in the file's size
(no pymatgen needed: positions and cell come from the dict). The energy is the MP2020-
corrected one unless ``--energy-key uncorrected``. VASP's stress in kBar becomes eV/Å³ in
ASE's sign: σ = -0.1 GPa/kBar x s. Every frame of one ``mp_id`` shares it as its split group
(frames of one relaxation are near-duplicates); the record id is the frame id.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
from ase import Atoms
from ase.units import GPa

from megagnn.data.shards import DataError

ENERGIES = {"corrected": "corrected_total_energy", "uncorrected": "uncorrected_total_energy"}
KBAR = -0.1 * GPa  # VASP's kBar (positive under compression) -> ASE's eV/Å^3
BLOCK = 1 << 20


def is_mptrj(path: str) -> bool:
    """A .json file whose first entry is an mp-id holding frames with a structure."""
    if not path.endswith(".json"):
        return False
    try:
        for _, frames in entries(path):
            first = next(iter(frames.values()), {})
            return isinstance(first, dict) and "structure" in first
    except (DataError, OSError, UnicodeDecodeError, AttributeError):
        return False
    return False


def energy_column(key: str) -> str:
    """The field of ``--energy-key``: corrected (default, 'energy') or uncorrected."""
    key = {"energy": "corrected"}.get(key, key).removesuffix("_total_energy")
    if key not in ENERGIES:
        raise DataError(f"--energy-key {key!r}: MPtrj has corrected (default) or uncorrected")
    return ENERGIES[key]


def entries(path: str) -> Iterator[tuple[str, dict]]:
    """(key, value) of the file's top-level JSON object, one at a time: only the entry
    being decoded is held in memory."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf, pos, done, consumed = "", 0, False, 0

        def more() -> bool:
            nonlocal buf, pos, done, consumed
            if done:
                return False
            block = f.read(BLOCK)
            done = not block
            consumed += pos
            buf, pos = buf[pos:] + block, 0
            return bool(block)

        def skip() -> str:
            """The next non-space character (not consumed); '' at the end of the file."""
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos].isspace():
                    pos += 1
                if pos < len(buf) or not more():
                    return buf[pos] if pos < len(buf) else ""

        def decode():
            nonlocal pos
            skip()  # raw_decode takes no leading space
            while True:
                try:
                    value, end = decoder.raw_decode(buf, pos)
                    pos = end
                    return value
                except json.JSONDecodeError as e:
                    if not more():
                        raise DataError(
                            f"{path}: malformed JSON at character {consumed + e.pos} ({e.msg})"
                        ) from e

        def expect(char: str) -> None:
            nonlocal pos
            found = skip()
            if found != char:
                raise DataError(
                    f"{path}: malformed JSON at character {consumed + pos}: expected "
                    f"{char!r}, found {found or 'the end of the file'!r}"
                )
            pos += 1

        expect("{")
        while True:
            if skip() == "}":
                return
            key = decode()
            expect(":")
            yield key, decode()
            if skip() == ",":
                pos += 1
            elif skip() != "}":
                expect("}")


def frame_atoms(frame: dict, energy_field: str) -> Atoms:
    """One MPtrj frame as ASE Atoms with its labels in eV, Å, eV/Å and eV/Å³."""
    structure = frame["structure"]
    lattice = structure["lattice"]
    cell = np.asarray(lattice["matrix"], dtype=np.float64).reshape(3, 3)
    sites = structure["sites"]
    symbols = [site["species"][0]["element"] for site in sites]
    if all("xyz" in site for site in sites):
        positions = np.array([site["xyz"] for site in sites], dtype=np.float64)
    else:
        positions = np.array([site["abc"] for site in sites], dtype=np.float64) @ cell
    atoms = Atoms(symbols=symbols, positions=positions, cell=cell, pbc=lattice.get("pbc", True))
    if frame.get(energy_field) is not None:
        atoms.info["energy"] = float(frame[energy_field])
    if frame.get("force") is not None:
        atoms.arrays["forces"] = np.asarray(frame["force"], dtype=np.float64).reshape(-1, 3)
    if frame.get("stress") is not None:
        atoms.info["stress"] = np.asarray(frame["stress"], dtype=np.float64).reshape(3, 3) * KBAR
    return atoms


def read(path: str, energy_key: str = "energy") -> Iterator[Atoms]:
    """Every frame of an MPtrj JSON file, streamed: ``info["group"]`` is its mp-id and
    ``info["id"]`` its frame id."""
    field = energy_column(energy_key)
    for mp_id, frames in entries(path):
        if not isinstance(frames, dict):
            raise DataError(f"{path}: {mp_id!r} holds {type(frames).__name__}, not frames")
        for frame_id, frame in frames.items():
            try:
                atoms = frame_atoms(frame, field)
            except (KeyError, IndexError, TypeError, ValueError) as e:
                raise DataError(
                    f"{path}: {mp_id}/{frame_id}: malformed MPtrj frame ({type(e).__name__}: {e})"
                ) from e
            atoms.info.update(group=str(mp_id), id=str(frame_id))
            yield atoms
