"""Scaling-law fits on synthetic data with known parameters, and the curve helpers."""

import math

import numpy as np
import pandas as pd
import pytest

from alcot.analysis.curves import at_matched_flops, interpolate, pareto_front
from alcot.analysis.fits import FitError, compute_ratio, fit_chinchilla, fit_power_law

E, A, ALPHA = 2.0, 3.0e3, 0.3


def power_law_runs(seed: int, runs: int = 8, per_run: int = 5, scale: float = 1.0):
    """Training curves of ``runs`` runs: L = E + A (C / scale)^-alpha, a per-run offset (runs
    differ) and per-point noise; ``scale`` k makes a method that needs k times the compute."""
    rng = np.random.default_rng(seed)
    c, loss, group = [], [], []
    for r in range(runs):
        offset = rng.normal(0, 0.01)
        for x in np.geomspace(1e10, 1e12, per_run) * rng.uniform(0.5, 2.0):
            c.append(x)
            loss.append((E + A * (x / scale) ** -ALPHA) * math.exp(offset + rng.normal(0, 0.005)))
            group.append(r)
    return np.array(c), np.array(loss), np.array(group)


@pytest.mark.slow  # bootstrap refits: tens of CPU seconds and more
def test_power_law_recovers_known_parameters_within_its_intervals():
    c, loss, g = power_law_runs(seed=1)
    fit = fit_power_law(c, loss, g, n_boot=100, seed=0)
    assert fit.n_points == 40 and fit.n_runs == 8 and not fit.notes
    for name, true in (("E", E), ("A", A), ("alpha", ALPHA)):
        lo, hi = fit.interval[name]
        assert lo <= true <= hi, (name, lo, true, hi)
        assert lo <= fit.params[name] <= hi
    assert fit.params["alpha"] == pytest.approx(ALPHA, rel=0.1)
    assert fit.params["E"] == pytest.approx(E, rel=0.05)
    pred = fit.predict(c)
    assert np.max(np.abs(np.log(pred / loss))) < 0.06


@pytest.mark.slow  # bootstrap refits: tens of CPU seconds and more
def test_chinchilla_recovers_known_parameters_within_its_intervals():
    e, a_, a, b_, b = 1.8, 400.0, 0.34, 410.0, 0.28
    rng = np.random.default_rng(2)
    n, d, loss, g = [], [], [], []
    for i, size in enumerate([1e6, 3e6, 1e7, 3e7]):
        for j, tokens in enumerate(np.geomspace(1e7, 1e9, 5)):
            n.append(size)
            d.append(tokens)
            loss.append((e + a_ / size**a + b_ / tokens**b) * math.exp(rng.normal(0, 0.005)))
            g.append(i * 10 + j)
    fit = fit_chinchilla(n, d, loss, g, n_boot=60, seed=0)
    truth = {"E": e, "A": a_, "a": a, "B": b_, "b": b}
    for name, true in truth.items():
        lo, hi = fit.interval[name]
        assert lo <= true <= hi, (name, lo, true, hi)
    assert fit.params["a"] == pytest.approx(a, abs=0.05)
    assert fit.params["b"] == pytest.approx(b, abs=0.05)


@pytest.mark.slow  # bootstrap refits: tens of CPU seconds and more
def test_bootstrap_interval_covers_the_truth_in_most_repetitions():
    """Nominal 90 % intervals of alpha over independent synthetic studies: the cluster
    bootstrap (resampling runs) should cover the true exponent in most of them."""
    reps, hits, widths = 16, 0, []
    for rep in range(reps):
        c, loss, g = power_law_runs(seed=100 + rep)
        fit = fit_power_law(c, loss, g, n_boot=50, seed=rep)
        lo, hi = fit.interval["alpha"]
        hits += lo <= ALPHA <= hi
        widths.append(hi - lo)
    assert hits >= 12, f"covered the true alpha in {hits} of {reps}"
    assert 0 < np.median(widths) < 0.2  # informative, not covering by being huge


@pytest.mark.slow  # bootstrap refits: tens of CPU seconds and more
def test_compute_ratio_recovers_a_known_compute_multiplier():
    c0, l0, g0 = power_law_runs(seed=3)
    c1, l1, g1 = power_law_runs(seed=4, scale=0.5)  # reaches any loss with half the compute
    ref = fit_power_law(c0, l0, g0, n_boot=60, seed=0)
    fit = fit_power_law(c1, l1, g1, n_boot=60, seed=1)
    target = float(np.median(l0))
    r = compute_ratio(fit, ref, target)
    assert r.ratio == pytest.approx(0.5, rel=0.15)
    assert r.interval[0] <= 0.5 <= r.interval[1]
    assert r.unreachable_frac == 0.0
    below_e = compute_ratio(fit, ref, 1.0)  # under the irreducible loss: never reached
    assert math.isinf(below_e.compute) and math.isnan(below_e.ratio)


def test_fits_refuse_what_the_data_cannot_support():
    c, loss, g = power_law_runs(seed=5, runs=2, per_run=2)
    with pytest.raises(FitError, match="needs at least 5 points; there are 4"):
        fit_power_law(c, loss, g, n_boot=0)
    c, loss, g = power_law_runs(seed=5, runs=1, per_run=8)
    with pytest.raises(FitError, match="at least 2 runs"):
        fit_power_law(c, loss, g, n_boot=0)
    with pytest.raises(FitError, match="distinct values of compute"):
        fit_power_law([1e10, 1e10, 2e10, 2e10, 3e10, 3e10], [3, 3, 2.9, 2.9, 2.8, 2.8], n_boot=0)
    n = [1e6] * 5 + [2e6] * 5
    d = list(np.geomspace(1e7, 1e9, 5)) * 2
    with pytest.raises(FitError, match="3 distinct values of model size N; there are 2"):
        fit_chinchilla(n, d, np.linspace(3, 2, 10), n_boot=0)
    c, loss, g = power_law_runs(seed=7)
    with pytest.raises(FitError, match="exponent of compute ended at its bound"):
        fit_power_law(c, 4.0 + 0.1 * np.log10(c), g, n_boot=0)  # loss grows with compute
    c, loss, g = power_law_runs(seed=6, runs=2, per_run=4)
    fit = fit_power_law(c, loss, g, n_boot=20)
    assert not fit.interval and "no interval" in fit.notes[0]


def test_pareto_front_and_matched_flops_interpolation():
    pts = pd.DataFrame({"flops": [1, 2, 3, 4, 5.0], "val_ppl": [9, 7, 8, 5, 6.0]})
    assert list(pareto_front(pts)["flops"]) == [1, 2, 4]
    run = pd.DataFrame({"run_id": "r", "flops": [10.0, 100.0], "val_loss": [3.0, 2.0]})
    got = interpolate(run, np.array([5.0, 10.0, math.sqrt(1000.0), 100.0, 1000.0]))
    assert np.isnan(got[0]) and np.isnan(got[4])
    assert got[1:4] == pytest.approx([3.0, 2.5, 2.0])  # linear in log compute
    assert interpolate(run, np.array([1000.0]), carry=True) == pytest.approx([2.0])
    curves = pd.concat(
        [run.assign(label="a"), run.assign(run_id="s", label="b", flops=[20.0, 1000.0])]
    )
    table = at_matched_flops(curves, np.array([100.0]), "label")
    assert table.loc["a"].iloc[0] == pytest.approx(math.exp(2.0))
    assert table.loc["b"].iloc[0] == pytest.approx(
        math.exp(2.0 + 1.0 * (1 - math.log(5) / math.log(50)))
    )
