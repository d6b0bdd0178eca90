"""Scaling-law fits with bootstrap confidence intervals.

Two laws, both fitted the way Hoffmann et al. fit "approach 3": in log space, with a Huber loss
on log-residuals (robust to a few bad runs) and L-BFGS from several starting points.

* :func:`fit_power_law`: ``L(C) = E + A * C^-alpha`` (loss against training compute).
* :func:`fit_chinchilla`: ``L(N, D) = E + A / N^a + B / D^b`` (parameters and tokens).

Both are the same model family, ``log L = logsumexp(e, a_1 - alpha_1 x_1, ...)`` with
``x_i = log(X_i / ref_i)``, so one objective with an analytic gradient serves both. Features are
centred on their geometric mean (``ref``) so that the optimiser sees numbers near 1 whatever the
units; reported parameters are converted back to the original units.

Why the starting-point grid is evaluated first: L-BFGS from every grid point costs seconds per
fit, and the bootstrap refits hundreds of times. The objective is evaluated at every grid point
in one vectorised pass, and L-BFGS runs from the best few only (bootstrap replicates start from
the full-data optimum plus the best grid points of their own data).

Intervals come from a cluster bootstrap over *runs*: points of one training curve are correlated,
so resampling points would give intervals that are too narrow. A fit with too few points, too
few distinct values of a feature or too few runs refuses with :class:`FitError` instead of
returning numbers that mean nothing.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize

from .load import AnalysisError


class FitError(AnalysisError):
    """The data cannot support the requested fit (too few points, runs or distinct values)."""


# ------------------------------------------------------------------ the objective
def _terms(thetas: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The log-space terms of the law, ``[e, a_i - alpha_i x_i]``, for parameter vectors
    ``thetas`` [m, p] at points ``x`` [n, k]: [m, n, 1 + k]."""
    k = x.shape[1]
    e, a, alpha = thetas[:, :1], thetas[:, 1 : 1 + k], thetas[:, 1 + k :]
    first = np.broadcast_to(e[:, None, :], (len(thetas), x.shape[0], 1))
    return np.concatenate([first, a[:, None] - x * alpha[:, None]], axis=2)


def _logsumexp(t: np.ndarray, axis: int) -> np.ndarray:
    """``log(sum(exp(t)))`` along ``axis``, stable. scipy.special.logsumexp does the same but
    costs ~14x more on these small arrays, and the bootstrap calls this ~10^5 times."""
    top = t.max(axis=axis, keepdims=True)
    return (top + np.log(np.exp(t - top).sum(axis=axis, keepdims=True))).squeeze(axis)


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    r = np.abs(r)
    return np.where(r <= delta, 0.5 * r * r, delta * (r - 0.5 * delta))


def _objective(theta: np.ndarray, x: np.ndarray, logy: np.ndarray, delta: float):
    """Huber loss of log-residuals and its gradient. ``theta = [e, a_1..a_k, alpha_1..alpha_k]``,
    ``x`` is [n, k] (log features, centred)."""
    k = x.shape[1]
    terms = _terms(theta[None], x)[0]  # [n, 1 + k]
    pred = _logsumexp(terms, axis=1)
    w = np.exp(terms - pred[:, None])  # d pred / d term
    r = pred - logy
    dr = np.clip(r, -delta, delta)  # d huber / d r
    grad = np.empty_like(theta)
    grad[0] = (dr * w[:, 0]).sum()
    grad[1 : 1 + k] = (dr[:, None] * w[:, 1:]).sum(axis=0)
    grad[1 + k :] = -(dr[:, None] * w[:, 1:] * x).sum(axis=0)
    return _huber(r, delta).sum(), grad


def _objective_many(thetas: np.ndarray, x: np.ndarray, logy: np.ndarray, delta: float):
    """The objective at many parameter vectors at once ([m, p] -> [m])."""
    return _huber(_logsumexp(_terms(thetas, x), axis=2) - logy, delta).sum(axis=1)


def _grid(logy: np.ndarray, k: int) -> np.ndarray:
    """Starting points: E below the best loss, A and alpha over plausible ranges."""
    lo = float(np.min(logy))
    es = [lo + math.log(f) for f in (0.2, 0.5, 0.8, 0.95)]
    # a: log of the reducible loss at the reference point (the geometric centre)
    a_s = [math.log(max(math.exp(lo) * f, 1e-6)) for f in (0.02, 0.1, 0.3, 1.0)]
    alphas = [0.05, 0.2, 0.5, 1.0]
    rows = [
        [e, *combo[:k], *combo[k:]]
        for e in es
        for combo in itertools.product(*([a_s] * k + [alphas] * k))
    ]
    return np.asarray(rows, dtype=float)


def _minimise(
    x: np.ndarray, logy: np.ndarray, delta: float, starts: np.ndarray, alpha_max: float
) -> tuple[np.ndarray, float]:
    k = x.shape[1]
    bounds = [(None, None)] * (1 + k) + [(0.0, alpha_max)] * k
    best, best_f = None, np.inf
    for theta0 in starts:
        res = minimize(
            _objective,
            theta0,
            args=(x, logy, delta),
            jac=True,
            method="L-BFGS-B",
            bounds=bounds,
            options={"maxiter": 500},
        )
        if np.isfinite(res.fun) and res.fun < best_f:
            best, best_f = res.x, float(res.fun)
    if best is None:
        raise FitError("the optimiser found no finite optimum")
    return best, best_f


# ------------------------------------------------------------------ results
@dataclass
class Fit:
    """A fitted law. ``params`` in original units; ``interval[name] = (low, high)`` from the
    bootstrap at ``level`` (absent when there were too few runs to resample)."""

    law: str  # "power_law" | "chinchilla"
    params: dict[str, float]
    n_points: int
    n_runs: int
    objective: float
    ref: tuple[float, ...]  # feature reference values (geometric means)
    theta: np.ndarray  # internal parameters (log space, centred features)
    level: float = 0.9
    interval: dict[str, tuple[float, float]] = field(default_factory=dict)
    replicates: list[dict[str, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def predict(self, *features, theta: np.ndarray | None = None) -> np.ndarray:
        """The law at ``features`` (one array per feature), with the fitted parameters or with
        ``theta`` (a bootstrap replicate's ``_theta``)."""
        theta = self.theta if theta is None else theta
        x = np.stack(
            [
                np.log(np.asarray(f, dtype=float) / r)
                for f, r in zip(features, self.ref, strict=True)
            ],
            axis=1,
        )
        k = x.shape[1]
        e, a, alpha = theta[0], theta[1 : 1 + k], theta[1 + k :]
        return np.exp(e) + (np.exp(a - x * alpha)).sum(axis=1)

    def compute_for(self, target_loss: float) -> float:
        """Power law only: the compute at which the fitted loss reaches ``target_loss``
        (``inf`` when the target is at or below the fitted irreducible loss E)."""
        return _compute_for(self.theta, self.ref[0], target_loss)


def _compute_for(theta: np.ndarray, ref: float, target_loss: float) -> float:
    e, a, alpha = theta
    gap = target_loss - math.exp(e)
    if gap <= 0 or alpha <= 0:
        return math.inf
    return ref * math.exp((a - math.log(gap)) / alpha)


def _natural(law: str, theta: np.ndarray, ref: tuple[float, ...]) -> dict[str, float]:
    """Internal parameters -> the law's parameters in original units."""
    if law == "power_law":
        e, a, alpha = theta
        return {"E": math.exp(e), "A": float(math.exp(a) * ref[0] ** alpha), "alpha": float(alpha)}
    e, a1, a2, al1, al2 = theta
    return {
        "E": math.exp(e),
        "A": float(math.exp(a1) * ref[0] ** al1),
        "a": float(al1),
        "B": float(math.exp(a2) * ref[1] ** al2),
        "b": float(al2),
    }


# ------------------------------------------------------------------ the fitting driver
@dataclass(frozen=True)
class FitOptions:
    """How a law is fitted: bootstrap replicates and confidence level, the seed of the
    resampling, the Huber threshold on log-residuals, and how many grid starts L-BFGS runs from."""

    n_boot: int = 200
    level: float = 0.9
    seed: int = 0
    delta: float = 1e-3
    n_starts: int = 8


def _check(
    feats: list[np.ndarray],
    groups: np.ndarray,
    names: list[str],
    min_distinct: int,
    min_runs: int,
    what: str,
) -> None:
    """Raise FitError when the points cannot determine the law (used for the data and for
    every bootstrap replicate alike)."""
    n_params = 1 + 2 * len(feats)
    n = len(groups)
    if n < n_params + 2:
        raise FitError(
            f"{what}: a {n_params}-parameter fit needs at least {n_params + 2} points; "
            f"there are {n}"
        )
    runs = len(np.unique(groups))
    if runs < min_runs:
        raise FitError(
            f"{what}: needs points from at least {min_runs} runs (a single training curve is "
            f"not a scaling law); there are {runs}"
        )
    for name, f in zip(names, feats, strict=True):
        distinct = len(np.unique(np.round(np.log(f), 6)))
        if distinct < min_distinct:
            raise FitError(
                f"{what}: needs at least {min_distinct} distinct values of {name}; there are "
                f"{distinct}"
            )


def _fit(
    law: str,
    features: list[np.ndarray],
    y: np.ndarray,
    groups: np.ndarray | None,
    names: list[str],
    opts: FitOptions,
    *,
    min_distinct: int,
    what: str,
    min_runs: int = 2,
    alpha_max: float = 3.0,
) -> Fit:
    y = np.asarray(y, dtype=float)
    feats = [np.asarray(f, dtype=float) for f in features]
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    ok = np.isfinite(y) & (y > 0)
    for f in feats:
        ok &= np.isfinite(f) & (f > 0)
    y, feats, groups = y[ok], [f[ok] for f in feats], groups[ok]
    k = len(feats)
    _check(feats, groups, names, min_distinct, min_runs, what)
    ref = tuple(float(np.exp(np.mean(np.log(f)))) for f in feats)
    x = np.stack([np.log(f / r) for f, r in zip(feats, ref, strict=True)], axis=1)
    logy = np.log(y)

    def solve(xs, ly, extra=None, top=opts.n_starts):
        grid = _grid(ly, k)
        order = np.argsort(_objective_many(grid, xs, ly, opts.delta))[:top]
        starts = grid[order]
        if extra is not None:
            starts = np.vstack([extra[None], starts])
        return _minimise(xs, ly, opts.delta, starts, alpha_max)

    theta, obj = solve(x, logy)
    fit = Fit(
        law,
        _natural(law, theta, ref),
        n_points=len(y),
        n_runs=len(np.unique(groups)),
        objective=obj,
        ref=ref,
        theta=theta,
        level=opts.level,
    )
    for name, value in zip(names, theta[1 + k :], strict=True):
        if value >= alpha_max * 0.999 or value <= 1e-3:
            raise FitError(
                f"{what}: the exponent of {name} ended at its bound ({value:.3g}; allowed 0 to "
                f"{alpha_max:g}): these points do not determine the law"
            )
    uniq = np.unique(groups)
    if opts.n_boot > 0 and len(uniq) < 3:
        fit.notes.append(f"no interval: the bootstrap resamples runs and there are {len(uniq)}")
    elif opts.n_boot > 0:
        _bootstrap(
            fit,
            law,
            x,
            logy,
            groups,
            uniq,
            solve,
            opts,
            ref,
            lambda idx: _check(
                [f[idx] for f in feats], groups[idx], names, min_distinct, min_runs, what
            ),
        )
    return fit


def _bootstrap(fit, law, x, logy, groups, uniq, solve, opts, ref, check) -> None:
    """Refit on ``opts.n_boot`` resamples of the runs. A resample the law cannot be fitted to
    (too few distinct sizes, say) is skipped; when more than half are, there is no interval:
    the runs are too few for the bootstrap to say anything."""
    rng = np.random.default_rng(opts.seed)
    members = {g: np.flatnonzero(groups == g) for g in uniq}
    skipped = 0
    for _ in range(opts.n_boot):
        pick = rng.choice(uniq, size=len(uniq), replace=True)
        idx = np.concatenate([members[g] for g in pick])
        try:
            check(idx)
            th, _ = solve(x[idx], logy[idx], extra=fit.theta, top=2)
        except FitError:
            skipped += 1
            continue
        rep = _natural(law, th, ref)
        rep["_theta"] = th
        fit.replicates.append(rep)
    if skipped * 2 > opts.n_boot:
        fit.notes.append(
            f"no interval: {skipped} of {opts.n_boot} resamples of the {len(uniq)} runs could "
            "not be fitted (too few runs)"
        )
        fit.replicates.clear()
        return
    if len(fit.replicates) < 10:
        fit.notes.append(f"no interval from {len(fit.replicates)} bootstrap replicates (< 10)")
        return
    if skipped:
        fit.notes.append(f"{skipped} of {opts.n_boot} bootstrap resamples could not be fitted")
    q = [(1 - opts.level) / 2, (1 + opts.level) / 2]
    for name in fit.params:
        lo, hi = np.quantile([r[name] for r in fit.replicates], q)
        fit.interval[name] = (float(lo), float(hi))


def fit_power_law(compute, loss, groups=None, what: str = "power-law fit", **options) -> Fit:
    """Fit ``L(C) = E + A * C^-alpha``. ``groups`` labels each point with its run (the unit the
    bootstrap resamples); without it every point is its own run. ``options``: see
    :class:`FitOptions`."""
    opts = FitOptions(**options)
    return _fit("power_law", [compute], loss, groups, ["compute"], opts, min_distinct=4, what=what)


def fit_chinchilla(
    params, tokens, loss, groups=None, what: str = "Chinchilla fit", **options
) -> Fit:
    """Fit ``L(N, D) = E + A / N^a + B / D^b`` (Hoffmann et al., approach 3). Needs at least
    three distinct model sizes and three distinct token counts: with two, ``E``, ``A`` and
    ``a`` cannot be told apart."""
    opts = FitOptions(**options)
    names = ["model size N", "tokens D"]
    return _fit(
        "chinchilla", [params, tokens], loss, groups, names, opts, min_distinct=3, what=what
    )


@dataclass
class Ratio:
    """Compute to reach a target loss, of one fit relative to a reference fit."""

    target_loss: float
    compute: float  # this method's compute at the target (inf: unreachable)
    reference_compute: float
    ratio: float
    interval: tuple[float, float] | None
    unreachable_frac: float  # share of bootstrap replicates in which either never reaches it


def compute_ratio(fit: Fit, reference: Fit, target_loss: float, level: float = 0.9) -> Ratio:
    """``C_fit(target) / C_reference(target)`` with a bootstrap interval: replicate i of each
    fit comes from independent resamples of each method's runs, so pairing them by index gives
    draws of the ratio."""
    c = fit.compute_for(target_loss)
    c0 = reference.compute_for(target_loss)
    ratio = c / c0 if math.isfinite(c0) and c0 > 0 else math.nan
    n = min(len(fit.replicates), len(reference.replicates))
    interval, unreachable = None, 0.0
    if n >= 10:
        draws = []
        bad = 0
        for r, r0 in zip(fit.replicates[:n], reference.replicates[:n], strict=True):
            ci = _compute_for(r["_theta"], fit.ref[0], target_loss)
            ci0 = _compute_for(r0["_theta"], reference.ref[0], target_loss)
            if not (math.isfinite(ci) and math.isfinite(ci0)):
                bad += 1
            draws.append(ci / ci0 if math.isfinite(ci0) else math.nan)
        draws = np.array([d for d in draws if not math.isnan(d)])
        unreachable = bad / n
        if len(draws) >= 10:
            q = [(1 - level) / 2, (1 + level) / 2]
            lo, hi = np.quantile(draws, q, method="inverted_cdf")
            interval = (float(lo), float(hi))
    return Ratio(target_loss, c, c0, ratio, interval, unreachable)
