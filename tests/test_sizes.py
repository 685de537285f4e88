"""Named model sizes: parameter counts match their names; large ones build on meta."""

import math
import re
from pathlib import Path

import pytest
import torch

from megagnn.config import load_config
from megagnn.models import build_model, count_parameters
from megagnn.parallel.materialize import materialize

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
    """A model built on meta and materialised has a normal model's tensors (names, shapes,
    dtypes, buffers) drawn by each layer's own default rule, reproducibly per seed."""
    cfg = load_config("configs/model/mgnn-100k.yaml").model
    normal = build_model(cfg)
    first = materialize(build_model(cfg, device="meta"), seed=0)
    again = materialize(build_model(cfg, device="meta"), seed=0)
    other = materialize(build_model(cfg, device="meta"), seed=1)
    ref, got = normal.state_dict(), first.state_dict()
    assert list(got) == list(ref)
    modules = dict(normal.named_modules())
    for name, value in got.items():
        assert value.device.type == "cpu" and value.shape == ref[name].shape, name
        assert value.dtype == ref[name].dtype, name
        assert torch.equal(value, again.state_dict()[name]), f"{name}: not reproducible"
        module_name, _, kind = name.rpartition(".")
        module = modules[module_name]
        if name in dict(normal.named_buffers()):
            assert torch.equal(value, ref[name]), f"buffer {name}"
            continue
        assert not torch.equal(value, other.state_dict()[name]), f"{name}: ignores the seed"
        if isinstance(module, torch.nn.Embedding):  # N(0, 1), as nn.Embedding draws
            assert value.std().item() == pytest.approx(1.0, rel=0.1), name
            continue
        # nn.Linear: weight and bias uniform in ±1/sqrt(fan_in), like torch's default
        bound = 1 / math.sqrt(module.in_features)
        assert value.abs().max() <= bound, name
        if value.numel() >= 256:  # a uniform's std is bound/sqrt(3); a normal's spread differs
            assert value.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1), name
            assert ref[name].std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1), name
