"""Named model sizes: parameter counts match their names; large ones build on meta."""

import re
from pathlib import Path

import pytest
import torch

from megagnn.config import load_config
from megagnn.models import build_model, count_parameters

SIZES = sorted(Path("configs/model").glob("*.yaml"))
UNITS = {"k": 1e3, "m": 1e6, "b": 1e9}


@pytest.mark.parametrize("path", SIZES, ids=[p.stem for p in SIZES])
def test_parameter_count_matches_name(path):
    number, unit = re.search(r"-(\d+)([kmb])$", path.stem).groups()
    target = int(number) * UNITS[unit]
    model = build_model(load_config(path).model, device="meta")
    n = count_parameters(model)
    assert 0.85 * target <= n <= 1.2 * target, f"{path.stem}: {n:,} parameters"
    assert all(p.device.type == "meta" for p in model.parameters())


def test_meta_model_materialises_like_a_normal_one():
    cfg = load_config("configs/model/mgnn-100k.yaml").model
    torch.manual_seed(0)
    ref = build_model(cfg)
    meta = build_model(cfg, device="meta")
    meta.to_empty(device="cpu")
    meta.load_state_dict(ref.state_dict())
    for (n1, p1), (n2, p2) in zip(ref.state_dict().items(), meta.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)
