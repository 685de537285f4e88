"""Fine-tuning: a new run that starts from a pretrained model (finetune.init_from).

The trunk (embedding, blocks) loads from the pretrained weights, their average where the
run kept one, saved under any parallel layout or consolidated, into this run's layout:
every rank reads only its own slice. Heads are matched by name, or mapped with
finetune.init_heads; a head with no pretrained source starts fresh.

What the pretrained network computes depends on two of its statistics, which are kept: the
neighbour normaliser (it scales every aggregation) and the output scale of each head it
starts from. The per-element reference energies are fitted on the new training split, as
for any run (a new dataset may measure energies from another zero), and a head's known
elements are those of its new training data.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch
from torch import nn

from megagnn.checkpoint import BEST, open_saved
from megagnn.config import Config, ConfigError, ModelConfig
from megagnn.parallel.state import ParallelState

TRUNK = ("family", "hidden", "layers", "num_rbf", "radial_hidden", "rbf", "cutoff")
TRUNK += ("envelope_p", "max_z", "lmax")
"""Model fields that must equal the pretrained model's: they set the trunk's shapes or the
function its weights compute."""
STATISTICS = ("scale", "atomic_energies", "trained_elements", "avg_num_neighbors")
HEAD = re.compile(r"energy_head\.mlps\.(\d+)\.(.+)")


class Pretrained:
    """A pretrained model to start from: a run, checkpoint or consolidated folder."""

    def __init__(self, source: str | Path, device: torch.device | None = None):
        self.source, self.device = str(source), device or torch.device("cpu")
        self.saved = open_saved(source, BEST)
        self.path: Path = self.saved.path
        self.cfg = self.saved.config
        self.heads = list(self.cfg.model.heads)
        self.scale = self.saved.read_whole("scale", self.device)  # [pretrained heads]
        self.avg_num_neighbors = float(self.saved.read_whole("avg_num_neighbors", self.device))

    def check(self, cfg: ModelConfig) -> None:
        """Refuse a trunk that differs from the pretrained one, naming each field."""
        diff = [
            f"model.{f}={getattr(self.cfg.model, f)!r} (this run: {getattr(cfg, f)!r})"
            for f in TRUNK
            if getattr(self.cfg.model, f) != getattr(cfg, f)
        ]
        if diff:
            raise ConfigError(
                f"finetune.init_from={self.source}: the pretrained trunk has "
                + ", ".join(diff)
                + "; set these (e.g. --set "
                + " ".join(f"{d.split(' ')[0]}" for d in diff)
                + ") or include the pretrained run's model config"
            )

    def head_sources(self, cfg: Config) -> dict[str, str | None]:
        """Each new head -> the pretrained head it starts from (None: fresh)."""
        explicit = dict(entry.partition("=")[::2] for entry in cfg.finetune.init_heads)
        out = {}
        for head in explicit:
            if head not in cfg.model.heads:
                raise ConfigError(
                    f"finetune.init_heads: {head!r} is not in model.heads={cfg.model.heads}"
                )
        for head in cfg.model.heads:
            old = explicit.get(head, head if head in self.heads else "")
            if old and old not in self.heads:
                raise ConfigError(
                    f"finetune.init_heads: {head}={old}, but the pretrained model has heads "
                    f"{self.heads}"
                )
            out[head] = old or None
        return out

    def adapt_statistics(self, statistics: dict, cfg: Config) -> dict:
        """The run's statistics with the pretrained neighbour normaliser and, for each
        dataset whose head starts from a pretrained one, that head's output scale."""
        out = copy.deepcopy(statistics)
        sources = self.head_sources(cfg)
        out["avg_num_neighbors"] = self.avg_num_neighbors
        for entry in out["datasets"]:
            head = entry.get("head", cfg.model.heads[0])
            old = sources.get(head)
            if old is not None:
                entry["scale"] = float(self.scale[self.heads.index(old)])
        out["init_from"] = {"source": self.source, "checkpoint": str(self.path), "heads": sources}
        return out

    def key_map(self, cfg: Config):
        """Global name in the new model -> the pretrained tensor it loads from (None: keep
        the value it has: statistics, fresh heads)."""
        sources = self.head_sources(cfg)

        def source(name: str) -> str | None:
            if name in STATISTICS:
                return None
            m = HEAD.fullmatch(name)
            if m is None:
                return name
            old = sources[cfg.model.heads[int(m[1])]]
            return None if old is None else f"energy_head.mlps.{self.heads.index(old)}.{m[2]}"

        return source

    def load_into(self, model: nn.Module, par: ParallelState, cfg: Config) -> list[str]:
        """Fill this rank's part of ``model``; returns the names left fresh (the pretrained
        model has no such tensor, e.g. a direct-force head). Collective under torchrun."""
        return self.saved.load_into(model, par, self.key_map(cfg))


def describe(pretrained: Pretrained, cfg: Config, fresh: list[str], frozen: int) -> str:
    heads = ", ".join(
        f"{new} <- {old}" if old else f"{new} fresh"
        for new, old in pretrained.head_sources(cfg).items()
    )
    text = f"fine-tuning from {pretrained.path}: heads {heads}"
    if fresh:
        text += f"; not in the pretrained model, left fresh: {', '.join(fresh)}"
    if frozen:
        text += f"; {frozen} parameter tensors frozen"
    return text
