"""Train/val/test splits by group, stable when data is appended.

Near-duplicate structures (frames of one MD trajectory, distortions of one parent cell or
molecule) share a *group*, and a split assigns whole groups: otherwise a test frame has a
near-copy 20 fs away in the training split and every test error is optimistic. A group goes
to a split by a hash of (its id, the split seed), never by its position in the dataset, so
appending shards never moves an old structure from one split to another.

Group ids are strings in the inputs; shards store their 64-bit hashes (``group_hash``).
"""

from __future__ import annotations

import hashlib

import numpy as np

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def group_hash(group: str) -> int:
    """A stable 64-bit hash of a group id (blake2b; Python's hash() changes per process)."""
    return int.from_bytes(hashlib.blake2b(group.encode(), digest_size=8).digest(), "little")


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 that spreads every input bit."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def uniform(groups: np.ndarray, seed: int, stream: int = 0) -> np.ndarray:
    """A number in [0, 1) per record, equal for records of one group, fixed by
    (group hash, seed, stream) alone."""
    key = _mix(np.array([(seed * 0x9E3779B1 + stream) & 0xFFFFFFFFFFFFFFFF], np.uint64))
    with np.errstate(over="ignore"):
        x = _mix(np.asarray(groups, np.uint64) ^ key) & _MASK
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def split_by_group(groups: np.ndarray, fractions: list[float], seed: int) -> dict[str, np.ndarray]:
    """Sorted record indices of train/val/test: each group lands in one split, with
    probability given by ``fractions``, so the sizes match them only on average."""
    u = uniform(groups, seed)
    train_end, val_end = fractions[0], fractions[0] + fractions[1]
    return {
        "train": np.flatnonzero(u < train_end),
        "val": np.flatnonzero((u >= train_end) & (u < val_end)),
        "test": np.flatnonzero(u >= val_end),
    }


def train_subset(train: np.ndarray, groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """About ``fraction`` of the training groups (at least one), drawn by a second hash: for
    one seed the subsets are nested (a larger fraction adds groups and drops none) and stay
    stable when data is appended. ``groups`` are the group hashes of ``train``."""
    if fraction >= 1:
        return train
    u = uniform(groups, seed, stream=1)
    keep = u < fraction
    if not keep.any() and len(train):
        keep = u == u.min()  # the one group drawn first
    return train[keep]


def assert_groups_disjoint(splits: dict[str, np.ndarray], groups: np.ndarray) -> None:
    """Raise if a group has records in two splits (the invariant the splits exist for)."""
    seen: dict[int, str] = {}
    for name, idx in splits.items():
        for g in np.unique(groups[idx]).tolist():
            if seen.setdefault(g, name) != name:
                raise AssertionError(f"group {g:#x} is in both {seen[g]} and {name}")
