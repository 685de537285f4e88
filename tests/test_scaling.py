import numpy as np
import pytest

from megagnn.scaling import fit_power_law


def test_recovers_a_known_power_law_with_intervals_that_cover_it():
    rng = np.random.default_rng(0)
    n = np.repeat(np.logspace(5, 9, 5), 2)
    loss = (0.05 + 30.0 * n**-0.35) * np.exp(rng.normal(0, 0.02, n.size))
    fit = fit_power_law(n, loss, bootstrap=100)
    assert fit.params["alpha"] == pytest.approx(0.35, abs=0.05)
    lo, hi = fit.intervals["alpha"]
    assert lo <= 0.35 <= hi and hi - lo < 0.2
    assert fit.log_rmse < 0.05


def test_joint_law_in_parameters_and_data():
    n, d = np.meshgrid(np.logspace(5, 8, 4), np.logspace(3, 6, 4))
    n, d = n.ravel(), d.ravel()
    loss = 0.02 + 20.0 * n**-0.3 + 5.0 * d**-0.25
    fit = fit_power_law(n, loss, d=d, bootstrap=20)
    assert fit.params["alpha"] == pytest.approx(0.3, abs=0.02)
    assert fit.params["beta"] == pytest.approx(0.25, abs=0.02)
    np.testing.assert_allclose(fit.predict(n, d), loss, rtol=1e-3)
    # the frontier it implies, against the minimum of the law along lines of C = N D found
    # numerically at two budgets
    best_n = []
    for c in (1e12, 1e14):
        grid = np.geomspace(1e3, 1e11, 200001)
        best_n.append(grid[np.argmin(fit.predict(grid, c / grid))])
    slope = np.log(best_n[1] / best_n[0]) / np.log(100)
    assert fit.params["a"] == pytest.approx(slope, abs=1e-3)
    assert fit.params["a"] + fit.params["b"] == pytest.approx(1)
    assert fit.intervals["a"][0] <= fit.params["a"] <= fit.intervals["a"][1]


def test_refuses_too_few_or_non_positive_points():
    with pytest.raises(ValueError, match="more points"):
        fit_power_law([1e5, 1e6], [0.3, 0.2])
    with pytest.raises(ValueError, match="positive"):
        fit_power_law([1e5, 1e6, 1e7], [0.3, 0.0, 0.1])


def _tool():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
    import scaling_laws

    return scaling_laws


def test_fit_writes_table_plots_and_recovers_exponents(tmp_path):
    """Finished sweep folders made from a known joint law: the tool's fits recover it."""
    import json

    tool = _tool()
    rng = np.random.default_rng(1)
    for n in (1e4, 3e4, 1e5, 3e5):
        for d in (250, 500, 1000, 2000):
            run = tmp_path / "sweep" / f"n{n:g}-d{d}"
            run.mkdir(parents=True)
            point = {
                "model": f"n{n:g}",
                "fraction": d / 2000,
                "parameters": int(n),
                "train_structures": d,
                "train_atoms": 30 * d,
            }
            (run / "point.json").write_text(json.dumps(point))
            noise = np.exp(rng.normal(0, 0.01, 2))
            metrics = {
                "energy_per_atom_mae": (0.002 + 3 * n**-0.4 + 0.5 * d**-0.5) * noise[0],
                "forces_mae": (0.02 + 2 * n**-0.3 + 1.0 * d**-0.35) * noise[1],
            }
            (run / "val_metrics.json").write_text(json.dumps(metrics))
    (tmp_path / "sweep" / "unfinished").mkdir()  # no val_metrics.json: left out
    stem = tmp_path / "out" / "scaling"
    assert (
        tool.main(["fit", str(tmp_path / "sweep"), "--results", str(stem), "--bootstrap", "30"])
        == 0
    )
    doc = json.loads(stem.with_suffix(".json").read_text())
    assert len(doc["points"]) == 16
    joint = doc["fits"]["energy"]["L(N, D)"]["params"]
    assert joint["alpha"] == pytest.approx(0.4, abs=0.05)
    assert joint["beta"] == pytest.approx(0.5, abs=0.05)
    assert doc["fits"]["forces"]["L(N, D)"]["params"]["alpha"] == pytest.approx(0.3, abs=0.05)
    assert (tmp_path / "out" / "scaling-energy.png").stat().st_size > 10_000
    assert "| L(N, D) | all points |" in stem.with_suffix(".md").read_text()


def test_sweep_runs_points_once_and_writes_cluster_scripts(emt_dataset, tmp_path):
    import json
    import shutil
    from pathlib import Path

    tool = _tool()
    config = Path(__file__).parents[1] / "configs" / "quickstart.yaml"
    common = [
        "sweep",
        "--config",
        str(config),
        "--models",
        "model.hidden=8,model.layers=1",
        "--fractions",
        "0.5",
        "1",
        "--out",
        str(tmp_path / "sweep"),
        "--set",
        f"data.path={emt_dataset}",
        "model.cutoff=4.0",
        "train.max_steps=2",
        "validate.every=0",
        "train.progress=false",
        "data.max_atoms=64",
    ]
    assert tool.main([*common, "--launch", "slurm"]) == 0
    script = (tmp_path / "sweep" / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-1" in script and "data.train_fraction=0.5" in script
    keep = ["--keep", str(tmp_path / "kept")]
    assert tool.main([*common, *keep, "--jobs", "2"]) == 0  # both points at once
    runs = sorted((tmp_path / "sweep").glob("hidden8-layers1-f*"))
    assert [r.name for r in runs] == ["hidden8-layers1-f0.5", "hidden8-layers1-f1"]
    half, full = (json.loads((r / "point.json").read_text()) for r in runs)
    assert half["parameters"] == full["parameters"] > 0
    assert 0 < half["train_structures"] < full["train_structures"]
    for r in runs:
        assert json.loads((r / "val_metrics.json").read_text())["step"] == 2
    stamp = [(r / "val_metrics.json").stat().st_mtime for r in runs]
    assert tool.main(common) == 0  # finished points are not rerun
    assert [(r / "val_metrics.json").stat().st_mtime for r in runs] == stamp
    # a new machine has only the kept records: the sweep is done there too, and fits
    kept = sorted((tmp_path / "kept").iterdir())
    assert [k.name for k in kept] == [r.name for r in runs]
    assert "threads: 1 per process" in (runs[0] / "sweep.log").read_text()
    shutil.rmtree(tmp_path / "sweep")
    assert tool.main([*common, *keep]) == 0
    assert not list((tmp_path / "sweep").iterdir())
    stem = str(tmp_path / "fit")
    tool.main(["fit", str(tmp_path / "kept"), "--results", stem, "--bootstrap", "5"])
    assert "hidden8-layers1" in (tmp_path / "fit.md").read_text()


def test_a_points_thread_count_serves_its_evaluation_too():
    """`--set train.threads=1` with --jobs 1 (two sweeps side by side): the evaluation must
    not take every core either."""
    tool = _tool()
    args = tool.parse_args(["sweep", "--config", "c.yaml", "--models", "m", "--out", "o"])
    point = {"set": ["train.threads=1"], "run": "r"}
    train, evaluate = tool.commands(point, args)
    assert evaluate[evaluate.index("--threads") + 1] == "1"
    train, evaluate = tool.commands({"set": [], "run": "r"}, args)
    assert "--threads" not in evaluate  # one point at a time: every core


def test_compute_optimal_frontier_recovers_chinchilla_exponents():
    """On L = E + A N^-alpha + B D^-beta with C = 6 N D, the IsoFLOP minima follow
    N_opt ∝ C^(beta / (alpha + beta)) and D_opt ∝ C^(alpha / (alpha + beta))."""
    from megagnn.scaling import compute_optimal_frontier

    alpha, beta = 0.34, 0.28
    rng = np.random.default_rng(0)
    rows = []
    for c in [1e13, 1e14, 1e15, 1e16]:  # optima from 2e7 to 4e8 parameters: inside the grid
        for n in np.geomspace(1e5, 1e10, 16):
            d = c / (6 * n)
            loss = 0.05 + 4000 * n**-alpha + 400 * d**-beta
            rows.append((c, n, d, loss * np.exp(rng.normal(0, 0.01))))
    c, n, d, loss = map(np.array, zip(*rows, strict=True))
    f = compute_optimal_frontier(c, n, d, loss, bootstrap=50)
    assert f.a == pytest.approx(beta / (alpha + beta), abs=0.05)
    assert f.b == pytest.approx(alpha / (alpha + beta), abs=0.05)
    assert f.intervals["a"][0] <= f.a <= f.intervals["a"][1]
    assert np.all(np.diff(f.n_opt) > 0) and len(f.budgets) == 4
    with pytest.raises(ValueError, match="two budgets"):
        compute_optimal_frontier(c[:16], n[:16], d[:16], loss[:16])


def test_budget_sweep_points_and_the_frontier_of_their_results(tmp_path):
    """--budgets adds a compute axis (one train.flops_budget per point); fit reads each
    point's compute.json and fits the frontier from the IsoFLOP minima."""
    import json

    tool = _tool()
    args = ["sweep", "--config", "configs/quickstart.yaml", "--models", "model.hidden=8"]
    args += ["model.hidden=16", "--budgets", "1e9", "3e9", "--out", str(tmp_path / "plan")]
    assert tool.main([*args, "--launch", "print"]) == 0
    script = (tmp_path / "plan" / "commands.sh").read_text()
    assert script.count("train.flops_budget=") == 4 and "hidden16-f1-c3e+09" in script
    # a base config that trains for epochs gets them replaced by the budget
    args = ["sweep", "--config", "configs/scaling/emt-cpu.yaml", "--models", "model.hidden=8"]
    args += ["--budgets", "1e9", "--out", str(tmp_path / "epochs"), "--launch", "print"]
    assert tool.main(args) == 0
    line = (tmp_path / "epochs" / "commands.sh").read_text().splitlines()[-1]
    sets = line.split("--set ", 1)[1].split(" && ")[0].split()
    from megagnn.config import load_config

    cfg = load_config("configs/scaling/emt-cpu.yaml", sets)
    assert cfg.train.epochs is None and cfg.train.flops_budget == 1e9
    # finished points made from a known law: at budget C a model of N parameters sees
    # D = C / (6 N) atoms
    for c in (1e13, 1e14, 1e15):
        for n in np.geomspace(1e5, 1e10, 11):
            run = tmp_path / "sweep" / f"n{n:.3g}-c{c:g}"
            run.mkdir(parents=True)
            d = c / (6 * n)
            point = {"model": f"n{n:.3g}", "fraction": 1.0, "budget": c, "parameters": int(n)}
            point.update(train_structures=100, train_atoms=3000)
            (run / "point.json").write_text(json.dumps(point))
            loss = 0.05 + 4000 * n**-0.34 + 400 * d**-0.28
            (run / "val_metrics.json").write_text(json.dumps({"forces_mae": loss}))
            spent = {"flops": c, "wall_s": 1.0, "atoms": d, "steps": 10}
            (run / "compute.json").write_text(json.dumps(spent))
    stem = tmp_path / "out" / "budgets"
    assert tool.main(["fit", str(tmp_path / "sweep"), "--results", str(stem)]) == 0
    frontier = json.loads(stem.with_suffix(".json").read_text())["frontier"]["forces"]
    assert frontier["a"] == pytest.approx(0.28 / 0.62, abs=0.05)
    assert "N_opt ∝ C^" in stem.with_suffix(".md").read_text()


def test_seed_noise_is_the_pooled_spread_of_repeated_points_and_widens_intervals():
    """seed_noise pools the log-loss spread over points trained more than once; a bootstrap
    given it draws a new seed per point, so its intervals widen (and without it they are the
    plain point resampling's, draw for draw)."""
    from megagnn.scaling import compute_optimal_frontier, seed_noise

    sigma, groups = seed_noise(["a", "a", "b", "b", "c"], np.exp([0.0, 0.2, 1.0, 1.4, 5.0]))
    assert groups == 2 and sigma == pytest.approx(np.sqrt((0.02 + 0.08) / 2))
    assert seed_noise(["a", "b"], [1.0, 2.0]) == (0.0, 0)

    rng = np.random.default_rng(3)
    rows = []
    for c in [1e13, 1e14, 1e15]:  # five sizes a budget, like a CPU-sized study
        for n in np.geomspace(1e6, 1e9, 5):
            loss = 0.05 + 4000 * n**-0.34 + 400 * (c / (6 * n)) ** -0.28
            rows.append((c, n, c / (6 * n), loss * np.exp(rng.normal(0, 0.01))))
    c, n, d, loss = map(np.array, zip(*rows, strict=True))

    def width(fit, key):
        lo, hi = fit.intervals[key]
        return hi - lo

    plain = compute_optimal_frontier(c, n, d, loss, bootstrap=100)
    assert compute_optimal_frontier(c, n, d, loss, bootstrap=100, noise=0.0) == plain
    noisy = compute_optimal_frontier(c, n, d, loss, bootstrap=100, noise=0.1)
    assert noisy.a == plain.a and width(noisy, "a") > 2 * width(plain, "a")
    x = np.repeat(np.logspace(5, 9, 5), 2)
    law = 0.05 + 30.0 * x**-0.35
    assert width(fit_power_law(x, law, bootstrap=50, noise=0.1), "alpha") > 2 * width(
        fit_power_law(x, law, bootstrap=50), "alpha"
    )


def test_fit_takes_repeated_points_into_the_fits_and_their_noise(tmp_path, capsys):
    """fit --repeats: points trained again with another seed join the fits, the table marks
    them, and their spread from the sweep's points is the seed noise the bootstrap adds."""
    import json

    tool = _tool()

    def write(folder, n, d, loss):
        run = folder / f"n{n}-d{d}"
        run.mkdir(parents=True)
        point = {"model": f"n{n}", "fraction": d / 1000, "parameters": n}
        point.update(train_structures=d, train_atoms=18 * d)
        (run / "point.json").write_text(json.dumps(point))
        (run / "val_metrics.json").write_text(json.dumps({"energy_mae": loss}))

    for n in (1e4, 3e4, 1e5, 3e5):
        for d in (100, 300, 1000):
            write(tmp_path / "sweep", int(n), d, 0.01 + 2 * n**-0.5 + 0.5 * d**-0.4)
    base = 0.01 + 2 * 1e4**-0.5 + 0.5 * np.array([100, 300]) ** -0.4
    for d, b, shift in ((100, base[0], 0.1), (300, base[1], -0.1)):
        write(tmp_path / "seed1", 10000, d, b * np.exp(shift))
    stem = tmp_path / "out" / "fit"
    args = ["fit", str(tmp_path / "sweep"), "--results", str(stem), "--bootstrap", "20"]
    assert tool.main([*args, "--repeats", str(tmp_path / "seed1")]) == 0
    doc = json.loads(stem.with_suffix(".json").read_text())
    noise = doc["seed_noise"]["energy_per_structure"]["grid"]
    assert noise["points"] == 2 and noise["sigma_log"] == pytest.approx(0.1 / np.sqrt(2))
    assert doc["fits"]["energy_per_structure"]["L(N, D)"]["points"] == 14
    text = stem.with_suffix(".md").read_text()
    assert text.count("(repeat)") == 2 and "MAE, grid points: 7.1%" in text
    # a mistyped folder is named in one line, not a traceback
    assert tool.main([*args, "--repeats", str(tmp_path / "seed2")]) == 2
    assert "seed2 is not a folder of finished points" in capsys.readouterr().err
    assert tool.main(["fit", str(tmp_path / "nowhere"), "--results", str(stem)]) == 2
