import pytest

from megagnn.config import ConfigError, load_config


def test_yaml_include_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("model: {family: schnet, hidden: 32}\ntrain: {lr: 0.1}\n")
    (tmp_path / "run.yaml").write_text("include: [base.yaml]\nmodel: {layers: 5}\n")
    cfg = load_config(tmp_path / "run.yaml", ["train.lr=3e-4", "data.split=[0.5, 0.25, 0.25]"])
    assert (cfg.model.family, cfg.model.hidden, cfg.model.layers) == ("schnet", 32, 5)
    assert cfg.train.lr == 3e-4
    assert cfg.data.split == [0.5, 0.25, 0.25]


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.hiden=3", "unknown config key"),
        ("optim.lr=1", "unknown config key"),
        ("model.family=gat", "use 'schnet' or 'painn'"),
        ("model.hidden=abc", "expected an integer"),
        ("train.resume=maybe", "expected true/false"),
        ("data.split=[0.5, 0.5]", "three fractions"),
        ("model.forces=direct", "model.stress=false"),
        ("train.lr", "section.key=value"),
    ],
)
def test_bad_config_is_an_error(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no/such.yaml")


def test_shipped_configs_load():
    from pathlib import Path

    for path in Path("configs").rglob("*.yaml"):
        load_config(path)
