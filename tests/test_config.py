import importlib.util
import re

import pytest

from megagnn.config import ACCELERATORS, ConfigError, ModelConfig, load_config


def test_yaml_include_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("model: {family: schnet, hidden: 32}\noptim: {lr: 0.1}\n")
    (tmp_path / "run.yaml").write_text("include: [base.yaml]\nmodel: {layers: 5}\n")
    cfg = load_config(tmp_path / "run.yaml", ["optim.lr=3e-4", "data.split=[0.5, 0.25, 0.25]"])
    assert (cfg.model.family, cfg.model.hidden, cfg.model.layers) == ("schnet", 32, 5)
    assert cfg.optim.lr == 3e-4
    assert cfg.data.split == [0.5, 0.25, 0.25]


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.hiden=3", "unknown config key"),
        ("optim.rate=1", "unknown config key"),
        ("train.lr=1", r"train.lr is now optim.lr \(write the new name\)"),
        ("train.eval_every=5", "train.eval_every is now validate.every"),
        ("model.family=gat", "use 'schnet', 'painn', 'egnn' or 'irrep'"),
        ("model.correlation=2", "2 with irrep"),
        ("model.correlation=3", "use 1, or 2"),
        ("model.hidden=abc", "expected an integer"),
        ("checkpoint.resume=maybe", "expected true/false"),
        ("data.split=[0.5, 0.5]", "three fractions"),
        ("model.forces=direct", "model.stress=false"),
        ("optim.lr", "section.key=value"),
        ("parallel.pipeline=2", "cannot train conservative forces"),
        ("train.microbatches=0", "microbatches"),
        ("kernels.backend=cuda", "use .auto., .triton. or .torch."),
        ("checkpoint.keep=-1", "checkpoint.keep must be >= 0"),
    ],
)
def test_bad_config_is_an_error(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_keeping_every_checkpoint_is_allowed():
    assert load_config(None, ["checkpoint.keep=0"]).checkpoint.keep == 0


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no/such.yaml")


def test_shipped_configs_load():
    from pathlib import Path

    for path in Path("configs").rglob("*.yaml"):
        load_config(path)


def test_pipeline_needs_a_block_per_stage():
    with pytest.raises(ConfigError, match="at least as many blocks"):
        load_config(
            None,
            ["parallel.pipeline=4", "model.layers=3", "model.forces=none", "model.stress=false"],
        )
    load_config(
        None, ["parallel.pipeline=3", "model.layers=3", "model.forces=none", "model.stress=false"]
    )


def test_stage_layers_cover_every_block_once():
    from megagnn.parallel.pipeline import stage_layers

    for layers in range(1, 9):
        for stages in range(1, layers + 1):
            parts = [stage_layers(layers, stages, s) for s in range(stages)]
            assert [i for r in parts for i in r] == list(range(layers))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_atomic_numbers_beyond_the_embedding_are_refused(emt_dataset, tmp_path):
    from megagnn.elements import UnknownElementError
    from megagnn.training.sources import DataSplits

    with pytest.raises(ConfigError, match="max_z"):
        load_config(None, ["model.max_z=119"])
    cfg = load_config(None, [f"data.path={emt_dataset}", "model.max_z=40"])
    with pytest.raises(UnknownElementError, match=r"model.max_z=40: raise it"):
        DataSplits(cfg)  # the EMT alloys hold Ag, Au, Pt ...


def test_saved_configs_of_older_runs_are_upgraded():
    """A config saved before the training section was split loads with every moved key
    under its new name; a user's file with an old key is refused (above)."""
    from megagnn.config import MOVED, config_from_dict, upgrade_saved

    old = {"train": {"lr": 0.5, "loss": "huber", "save_every": 7, "shard_optimizer": False}}
    cfg = config_from_dict(upgrade_saved(old))
    assert (cfg.optim.lr, cfg.loss.function, cfg.checkpoint.every) == (0.5, "huber", 7)
    assert cfg.parallel.shard_optimizer is False
    for new in MOVED.values():  # every new name exists
        section, key = new.split(".")
        assert hasattr(getattr(cfg, section), key), new


def test_pretrain_help_lists_every_field_with_its_docstring(capsys):
    import dataclasses

    from megagnn.config import Config
    from megagnn.pretrain import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    for section in dataclasses.fields(Config):
        for field in dataclasses.fields(
            section.type
            if isinstance(section.type, type)
            else type(getattr(Config(), section.name))
        ):
            assert f"  {section.name}.{field.name} (" in text, field.name
    assert "optim.lr (float, default 0.001)\n      Peak learning rate (AdamW)." in text


def test_threads_are_the_cores_per_local_process(monkeypatch):
    import os

    import torch

    from megagnn.parallel.state import set_threads

    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    try:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores * 2))
        assert set_threads().startswith("threads: 1 per process")
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
        assert set_threads().startswith(f"threads: {cores} per process ({cores} cores")
        assert set_threads(3) == "threads: 3 per process (train.threads)"
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ConfigError, match="train.threads must be >= 1"):
        load_config(None, ["train.threads=0"])


@pytest.mark.parametrize("choice", sorted(ACCELERATORS))
def test_tensor_product_libraries_say_what_to_install(choice, monkeypatch):
    with pytest.raises(ConfigError, match="'auto', 'e3nn', 'cueq' or 'oeq'"):
        ModelConfig(family="irrep", tensor_product="fast")
    with pytest.raises(ConfigError, match="irrep only"):
        ModelConfig(family="painn", tensor_product=choice)
    module, install = ACCELERATORS[choice]
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a)
    )
    with pytest.raises(ConfigError, match=f"needs {re.escape(install)}, or use"):
        ModelConfig(family="irrep", tensor_product=choice)
