"""The frame shared by backbones whose node state is one scalar tensor (SchNet, EGNN)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class ScalarBackbone(nn.Module):
    """Embedding -> ``layers`` blocks from ``make_block`` -> per-atom scalar features [N, H].

    The node state between blocks is ``(h,)``; ``pack``/``unpack`` turn it into one [N, H]
    tensor for pipeline stages. ``split_nodes``/``gather_nodes`` are where tensor
    parallelism may enter and leave a node-parallel region.
    """

    def __init__(self, hidden: int, layers: int, max_z: int, make_block: Callable[[], nn.Module]):
        super().__init__()
        self.hidden = hidden
        self.embedding = nn.Embedding(max_z + 1, hidden)
        self.blocks = nn.ModuleList(make_block() for _ in range(layers))
        self.split_nodes = nn.Identity()
        self.gather_nodes = nn.Identity()

    def embed(self, atomic_numbers: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.split_nodes(self.embedding(atomic_numbers)),)  # [N, H]

    def scalars(self, state: tuple[torch.Tensor]) -> torch.Tensor:
        return self.gather_nodes(state[0])  # [N, H]

    @staticmethod
    def pack(state: tuple[torch.Tensor]) -> torch.Tensor:
        return state[0]

    def unpack(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (x,)
