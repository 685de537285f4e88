"""Scaling-law fits with bootstrap confidence intervals.

    L(N)    = E + A N^-alpha                 (loss vs parameters at fixed data)
    L(D)    = E + B D^-beta                  (loss vs data at fixed model size)
    L(N, D) = E + A N^-alpha + B D^-beta     (joint; the form of Hoffmann et al. 2022)

Fits are least squares in log-loss (relative errors weigh small and large losses alike),
with E, A, B and the exponents kept positive by fitting their logarithms. Intervals are
bootstrap percentiles: refits on points resampled with replacement. On a few points per
curve (an IsoFLOP parabola through four) the scatter of the points about the curve says
little of how far a point moves when it is trained again with another seed. Given that
seed-to-seed spread (``seed_noise`` of repeated points), the bootstrap is parametric: a
resample is the fitted curve at the resampled points times a fresh seed's noise, which is
what rerunning the same design with new seeds would give if the curve is right.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import least_squares


def _unpack(theta: np.ndarray, joint: bool) -> dict[str, float]:
    # E = exp(e) >= 0; A, B = exp(.) > 0; exponents = exp(.) > 0
    out = {"E": np.exp(theta[0]), "A": np.exp(theta[1]), "alpha": np.exp(theta[2])}
    if joint:
        out.update(B=np.exp(theta[3]), beta=np.exp(theta[4]))
    return out


def _predict(p: dict[str, float], n: np.ndarray, d: np.ndarray | None) -> np.ndarray:
    loss = p["E"] + p["A"] * n ** -p["alpha"]
    if d is not None:
        loss = loss + p["B"] * d ** -p["beta"]
    return loss


def _fit_once(n: np.ndarray, loss: np.ndarray, d: np.ndarray | None) -> dict[str, float]:
    joint = d is not None
    # scale-free starting point: E below the smallest loss, exponents 0.3
    start = [np.log(0.5 * loss.min()), np.log(loss.max()) + 0.3 * np.log(n.min()), np.log(0.3)]
    if joint:
        start += [np.log(loss.max()) + 0.3 * np.log(d.min()), np.log(0.3)]

    def residual(theta):
        return np.log(_predict(_unpack(theta, joint), n, d)) - np.log(loss)

    result = least_squares(residual, np.array(start), method="trf", max_nfev=5000)
    return _unpack(result.x, joint)


def _with_frontier(p: dict[str, float]) -> dict[str, float]:
    """Adds to a joint fit the frontier it implies (approach 3 of Hoffmann et al. 2022):
    minimising E + A N^-alpha + B D^-beta at fixed C ∝ N D gives N_opt ∝ C^a and
    D_opt ∝ C^b with a = beta / (alpha + beta) and b = alpha / (alpha + beta)."""
    if "beta" in p:
        p["a"] = p["beta"] / (p["alpha"] + p["beta"])
        p["b"] = p["alpha"] / (p["alpha"] + p["beta"])
    return p


def seed_noise(keys: list, loss: np.ndarray) -> tuple[float, int]:
    """(sigma, groups): the pooled standard deviation of log loss between points that share a
    key (the same point trained with different seeds), over the keys seen more than once."""
    logs: dict = {}
    for key, value in zip(keys, np.log(np.asarray(loss, float)), strict=True):
        logs.setdefault(key, []).append(value)
    groups = [np.array(v) for v in logs.values() if len(v) > 1]
    dof = sum(len(g) - 1 for g in groups)
    if not dof:
        return 0.0, 0
    return float(np.sqrt(sum(((g - g.mean()) ** 2).sum() for g in groups) / dof)), len(groups)


def _reseeded(loss: np.ndarray, fitted: np.ndarray, noise: float, rng) -> np.ndarray:
    """The losses of one bootstrap resample: the points as measured, or, given the seed noise,
    the fitted curve times a fresh seed's noise (not the measured points times it: they
    carry one seed's noise already, so that would count it twice)."""
    return fitted * np.exp(rng.normal(0.0, noise, loss.shape)) if noise else loss


@dataclass
class PowerLawFit:
    """Best-fit parameters, bootstrap percentile intervals and the fit's log-RMS error."""

    params: dict[str, float]
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    log_rmse: float = 0.0
    points: int = 0

    def predict(self, n, d=None) -> np.ndarray:
        return _predict(self.params, np.asarray(n, float), None if d is None else np.asarray(d))


def fit_power_law(
    x: np.ndarray,
    loss: np.ndarray,
    d: np.ndarray | None = None,
    bootstrap: int = 200,
    level: float = 0.9,
    seed: int = 0,
    noise: float = 0.0,
) -> PowerLawFit:
    """Fit L(x) = E + A x^-alpha, or the joint law in (x, d) = (N, D) when ``d`` is given.
    ``noise``: the seed-to-seed spread of log loss; given, the bootstrap is parametric."""
    x, loss = np.asarray(x, float), np.asarray(loss, float)
    d = None if d is None else np.asarray(d, float)
    if len(x) < (5 if d is not None else 3) or np.any(loss <= 0) or np.any(x <= 0):
        raise ValueError("need positive sizes and losses, and more points than parameters")
    best = _with_frontier(_fit_once(x, loss, d))
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        idx = rng.integers(0, len(x), len(x))
        if len(np.unique(x[idx])) < 3:  # a resample without three sizes cannot fit a curve
            continue
        xi, di = x[idx], None if d is None else d[idx]
        drawn = _reseeded(loss[idx], _predict(best, xi, di), noise, rng)
        samples.append(_with_frontier(_fit_once(xi, drawn, di)))
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    intervals = {}
    for k in best if samples else ():
        values = [s[k] for s in samples]
        intervals[k] = (float(np.percentile(values, lo)), float(np.percentile(values, hi)))
    rmse = float(np.sqrt(np.mean((np.log(_predict(best, x, d)) - np.log(loss)) ** 2)))
    return PowerLawFit({k: float(v) for k, v in best.items()}, intervals, rmse, len(x))


# -- compute-optimal frontier (IsoFLOP profiles, approach 2 of Hoffmann et al. 2022) ---------
def _profile_parabola(n: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Coefficients (highest first) of the parabola in log N through an IsoFLOP profile's
    log losses."""
    return np.polyfit(np.log(n), np.log(loss), 2)


def isoflop_minimum(n: np.ndarray, d: np.ndarray, loss: np.ndarray) -> tuple[float, float]:
    """(N_opt, D_opt) of one compute budget: the minimum of a parabola in log N through the
    points (the best point if the parabola opens downwards), kept inside the sizes tried;
    D_opt interpolated log-linearly in N from the points' data (atoms processed)."""
    x, y = np.log(n), np.log(loss)
    if len(np.unique(x)) < 3:
        raise ValueError("an IsoFLOP profile needs at least three model sizes")
    c2, c1, _ = _profile_parabola(n, loss)
    best = x[np.argmin(y)] if c2 <= 0 else float(np.clip(-c1 / (2 * c2), x.min(), x.max()))
    slope, icept = np.polyfit(x, np.log(d), 1)
    return float(np.exp(best)), float(np.exp(icept + slope * best))


@dataclass
class Frontier:
    """N_opt(C) ∝ C^a and D_opt(C) ∝ C^b from the minima of IsoFLOP profiles, with
    bootstrap percentile intervals of the exponents (points resampled within budgets)."""

    budgets: list[float]
    n_opt: list[float]
    d_opt: list[float]
    a: float
    b: float
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)


def compute_optimal_frontier(
    c: np.ndarray,
    n: np.ndarray,
    d: np.ndarray,
    loss: np.ndarray,
    bootstrap: int = 200,
    level: float = 0.9,
    seed: int = 0,
    noise: float = 0.0,
) -> Frontier:
    """The frontier of points (budget c, parameters n, data d, loss) on two or more budgets,
    each with three or more model sizes; ``noise`` as in `fit_power_law`."""
    c, n, d, loss = (np.asarray(v, float) for v in (c, n, d, loss))
    budgets = np.unique(c)
    if len(budgets) < 2:
        raise ValueError("a compute-optimal frontier needs at least two budgets")
    groups = [np.flatnonzero(c == b) for b in budgets]

    def frontier(choice, loss=loss):
        opt = np.array([isoflop_minimum(n[g], d[g], loss[g]) for g in choice])
        a = np.polyfit(np.log(budgets), np.log(opt[:, 0]), 1)[0]
        b = np.polyfit(np.log(budgets), np.log(opt[:, 1]), 1)[0]
        return opt, float(a), float(b)

    opt, a, b = frontier(groups)
    fitted = np.empty_like(loss)  # each profile's parabola, at its points
    for g in groups if noise else ():
        fitted[g] = np.exp(np.polyval(_profile_parabola(n[g], loss[g]), np.log(n[g])))
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        choice = [rng.choice(g, len(g)) for g in groups]
        try:
            samples.append(frontier(choice, _reseeded(loss, fitted, noise, rng))[1:])
        except (ValueError, np.linalg.LinAlgError):
            continue  # a resample with fewer than three sizes in some budget
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    intervals = {}
    if samples:
        s = np.array(samples)
        for k, col in (("a", 0), ("b", 1)):
            intervals[k] = (
                float(np.percentile(s[:, col], lo)),
                float(np.percentile(s[:, col], hi)),
            )
    return Frontier(budgets.tolist(), opt[:, 0].tolist(), opt[:, 1].tolist(), a, b, intervals)
