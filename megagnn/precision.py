"""What ``train.precision`` means for the weights: fp32 master weights under bf16 autocast
(the dense layers compute in bf16, geometry and accumulators stay fp32), fp64 for tests and
MD that must conserve energy."""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.float32, "fp64": torch.float64}
"""train.precision -> the dtype the weights (and the inputs' geometry) are held in."""
