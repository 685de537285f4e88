"""Refuse elements a model was not trained on: it would serve them from an untrained
embedding and a zero reference energy, silently."""

from __future__ import annotations

from collections.abc import Iterable

from ase.data import chemical_symbols

MAX_Z = len(chemical_symbols) - 1  # 118


class UnknownElementError(ValueError):
    """Structures hold elements the model never saw in training; the message names them."""


def _names(zs: Iterable[int]) -> str:
    return ", ".join(
        f"{chemical_symbols[z] if 0 < z <= MAX_Z else '?'} (Z={z})" for z in sorted(zs)
    )


def check_elements(
    numbers: Iterable[int], known: set[int] | None, what: str = "the model", allow: bool = False
) -> None:
    """Raise UnknownElementError if ``numbers`` holds an element outside ``known`` (None: a
    model with no recorded elements, nothing to check). ``allow`` is the experts' opt-out."""
    if known is None or allow:
        return
    unknown = set(int(z) for z in numbers) - known
    if unknown:
        raise UnknownElementError(
            f"{_names(unknown)} not in the training data of {what} (trained on "
            f"{_names(known)}); its predictions there would come from an untrained embedding "
            "and a zero reference energy. Pass allow_unknown_elements=True "
            "(--allow-unknown-elements) to evaluate anyway"
        )


def check_max_z(numbers: Iterable[int], max_z: int, what: str) -> None:
    """Refuse atomic numbers beyond the embedding (``model.max_z``) or the periodic table."""
    beyond = {int(z) for z in numbers if not 0 < int(z) <= min(max_z, MAX_Z)}
    if beyond:
        raise UnknownElementError(
            f"{what} holds atomic numbers {sorted(beyond)} outside 1..{min(max_z, MAX_Z)}"
            + (f" (model.max_z={max_z}: raise it)" if max_z < MAX_Z else "")
        )
