"""megagnn.evaluate on every form a trained model takes (run, consolidated folder, .pt2
package), its element check, and the warnings a new user needs (size, resume)."""

import json
import sys
from pathlib import Path

import ase.io
import pytest
from test_training import tiny_config

from megagnn.convert import consolidate
from megagnn.data.emt import generate
from megagnn.data.preprocess import preprocess
from megagnn.evaluate import main as evaluate_main
from megagnn.training.trainer import Trainer

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
from convert_checkpoint import main as convert_main  # noqa: E402


@pytest.fixture(scope="module")
def trained(emt_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluate")
    Trainer(tiny_config(emt_dataset, out / "run")).train()
    consolidate(out / "run", out / "consolidated", progress=False)
    assert convert_main(["package", str(out / "run"), str(out / "model.pt2")]) == 0
    return out


def _metrics(tmp_path, *args):
    out = tmp_path / "m.json"
    assert evaluate_main([*args, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_run_consolidated_and_package_evaluate_alike(trained, tmp_path):
    run = _metrics(tmp_path, "--run", str(trained / "run"))
    folder = _metrics(tmp_path, "--run", str(trained / "consolidated"))
    package = _metrics(tmp_path, "--run", str(trained / "model.pt2"))
    assert run["structures"] == folder["structures"] == package["structures"] > 0
    for key in ("energy_per_atom_mae", "forces_mae", "stress_mae", "baseline_energy_per_atom_mae"):
        assert folder[key] == run[key], key
        assert package[key] == pytest.approx(run[key], rel=1e-4), key  # fp64 package


def test_unknown_elements_are_refused_by_name(trained, tmp_path, capsys):
    """A dataset with Fe, which the EMT alloys lack: refused, naming Fe, unless allowed."""
    frames = list(generate(6, seed=5, md_fraction=0.0, progress=False))
    for atoms in frames[:2]:
        atoms.numbers[0] = 26
    path = tmp_path / "fe.extxyz"
    ase.io.write(path, frames)
    preprocess([str(path)], tmp_path / "fe", progress=False)
    args = ["--run", str(trained / "run"), "--data", str(tmp_path / "fe")]
    for split in ("train", "val", "test"):  # the split holding Fe is refused
        code = evaluate_main([*args, "--split", split])
        if code:
            assert "Fe (Z=26)" in capsys.readouterr().err
            break
    else:
        pytest.fail("no split with Fe was refused")
    metrics = _metrics(tmp_path, *args, "--split", split, "--allow-unknown-elements")
    assert metrics["unknown_element_structures"] >= 1


def test_a_size_made_for_another_family_warns(emt_dataset, tmp_path):
    cfg = tiny_config(emt_dataset, tmp_path, "model.family=schnet", "model.sized_for=painn")
    with pytest.warns(UserWarning, match=r"made for painn: [\d,]+ parameters"):
        Trainer(cfg)


def test_resuming_a_reused_out_dir_says_so_first(emt_dataset, tmp_path, capsys):
    Trainer(tiny_config(emt_dataset, tmp_path, "train.max_steps=3")).train()
    capsys.readouterr()
    Trainer(tiny_config(emt_dataset, tmp_path, "train.max_steps=4"))
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("resuming ") and "checkpoint.resume=false" in first
