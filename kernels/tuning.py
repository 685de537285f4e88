"""Launch configurations: each launcher's default and the set a GPU run may pick from.

The first entry of every set is what the launcher uses unless autotuning is on
(``set_autotune``, ``kernels.autotune``). With it on, the first launch of each shape
class times every entry on the device (``triton.testing.do_bench``) and keeps the fastest
for that class. A launcher hands ``choose`` a function that allocates its outputs and
launches with a given configuration, so timing a candidate leaves nothing behind (atomics
add into fresh zeros).

Every entry compiles for sm_90 within its shared memory and without register spills, in
every dtype its launcher takes (tests/test_kernels_aot.py; ``python -m megagnn.kernels.aot
--configs``), and computes what the reference does (tests/test_kernels.py, interpreter).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import triton

T = TypeVar("T")


@dataclass(frozen=True)
class Config:
    block_e: int
    """Edges per step (message kernels: at least 16, tl.dot's smallest tile)."""
    block_h: int | None = None
    """Most channels per program (None: the kernel has no channel blocks)."""
    num_warps: int | None = None
    """Warps per program (None: Triton's default, 4)."""

    def options(self) -> dict:
        return {} if self.num_warps is None else {"num_warps": self.num_warps}


CONFIGS: dict[str, tuple[Config, ...]] = {
    "segment_sum_csr": (
        Config(16, 128),
        Config(32, 128),
        Config(8, 64, num_warps=2),
        Config(32, 256, num_warps=8),
    ),
    "segment_sum_atomic": (
        Config(32, 128),
        Config(64, 128, num_warps=8),
        Config(128, 64, num_warps=8),
        Config(16, 128, num_warps=2),
    ),
    "cfconv": (
        Config(16, 64),
        Config(32, 64),
        Config(16, 128, num_warps=8),
        Config(16, 32, num_warps=2),
    ),
    "cfconv_backward": (
        Config(16, 64),
        Config(16, 32),
        Config(32, 32, num_warps=8),
        Config(16, 64, num_warps=8),
    ),
    "painn": (
        Config(16, 32),
        Config(32, 32),
        Config(16, 64, num_warps=8),
        Config(16, 16, num_warps=2),
    ),
    # 16 channels and 16 edges a step on 8 warps only: 32 edges, 32 channels or 4 warps
    # spill in fp64, and 16 warps cap a thread at 128 registers and spill in every dtype
    "painn_backward": (Config(16, 16, num_warps=8),),
    "radial": (
        Config(64),
        Config(128),
        Config(32, num_warps=2),
        Config(256, num_warps=8),
    ),
}

_autotune = False
_best: dict[tuple, Config] = {}
_forced: int | None = None


@contextlib.contextmanager
def forcing(index: int) -> Iterator[None]:
    """Every launcher uses entry ``index`` of its set (its last if the set is shorter): to
    compile and test every entry."""
    global _forced
    saved, _forced = _forced, index
    try:
        yield
    finally:
        _forced = saved


def set_sizes() -> int:
    """The length of the longest set."""
    return max(len(c) for c in CONFIGS.values())


def set_autotune(flag: bool) -> None:
    """Time every configuration at the first launch of each shape class (GPUs only)."""
    global _autotune
    _autotune = flag


def _time(fn: Callable[[], object]) -> float:
    return triton.testing.do_bench(fn)


def choose(name: str, key: tuple, launch: Callable[[Config], T]) -> T:
    """``launch(config)`` with the default configuration of ``name``, or with autotuning
    on, with the fastest for ``key`` (timed the first time ``key`` comes)."""
    configs = CONFIGS[name]
    if _forced is not None:
        return launch(configs[min(_forced, len(configs) - 1)])
    if not _autotune or len(configs) == 1:
        return launch(configs[0])
    best = _best.get((name, key))
    if best is None:
        times = [_time(lambda c=c: launch(c)) for c in configs]
        best = _best[(name, key)] = configs[times.index(min(times))]
    return launch(best)


def size_class(n: int) -> int:
    """Sizes that vary from batch to batch (edges, nodes) share a timing per power of two."""
    return triton.next_power_of_2(max(n, 1))
