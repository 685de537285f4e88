"""Maximal update parametrisation (μP; Yang et al. 2022, "Tensor Programs V"), for Adam.

Under the standard parametrisation the best learning rate shifts as a model widens, so a
scaling study must tune it per size. μP scales, per weight matrix, the initialisation and
Adam's learning rate with the width multiplier m = fan_in / fan_in at ``mup_base_width``
(Table 3 of the paper, the formulation without forward multipliers):
- input weights (fan_in fixed: embeddings, radial-basis layers) and all biases: unchanged;
- hidden weights (fan_in and fan_out grow with width): learning rate x 1/m;
- output weights (fan_in grows, fan_out fixed: readouts): learning rate x 1/m, initial
  values x 1/sqrt(m) (variance 1/fan_in^2 instead of 1/fan_in).
At the base width μP is the standard parametrisation, so a learning rate tuned there is
meant to hold at every width. Which dimensions grow is read off the model itself: it is
built twice on the meta device, at its width and at the base width, and each parameter's
shapes are compared (the idea of the ``mup`` package's base shapes), so any family works.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from megagnn.config import ModelConfig


@dataclass(frozen=True)
class MupScales:
    """Per global parameter name: learning-rate and initialisation multipliers."""

    lr: dict[str, float]
    init: dict[str, float]


def _fans(module: nn.Module, shape) -> tuple[int, int]:
    if isinstance(module, nn.Embedding):  # [num_embeddings, dim]: a lookup, fan_in is fixed
        return shape[0], shape[1]
    return shape[1], shape[0]  # Linear weight [out, in]


def mup_scales(cfg: ModelConfig, full: nn.Module) -> MupScales:
    """The μP multipliers of every weight of ``full``, the model ``cfg`` describes (empty
    maps under the standard parametrisation)."""
    if cfg.parametrization != "mup":
        return MupScales({}, {})
    from megagnn.models import build_model

    base = build_model(replace(cfg, hidden=cfg.mup_base_width), device="meta")
    lr, init = {}, {}
    base_modules = dict(base.named_modules())
    for mname, module in full.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            q = getattr(base_modules[mname], pname)
            if p.dim() < 2:
                continue  # biases and vectors: unchanged
            fan_in, fan_out = _fans(module, p.shape)
            base_in, base_out = _fans(module, q.shape)
            if fan_in == base_in:
                continue  # input (or width-independent) weights: unchanged
            name, m = f"{mname}.{pname}", fan_in / base_in
            lr[name] = 1.0 / m
            if fan_out == base_out:  # output weights
                init[name] = m**-0.5
    return MupScales(lr, init)
