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


def test_refuses_too_few_or_non_positive_points():
    with pytest.raises(ValueError, match="more points"):
        fit_power_law([1e5, 1e6], [0.3, 0.2])
    with pytest.raises(ValueError, match="positive"):
        fit_power_law([1e5, 1e6, 1e7], [0.3, 0.0, 0.1])
