"""Scaling-law fits over a study, per method, and the compute each method needs to reach a
target perplexity relative to vanilla.

Which points a compute law is fitted to matters. ``points`` chooses:

* ``envelope`` (default): the compute-efficient frontier of each method's evaluation points
  (the lowest loss any of its runs reached by each compute level). A study that varies size and
  budget traces out L(C) along this envelope; points of an undertrained size off the envelope
  would bias the exponent.
* ``final``: each run's last evaluation only (one point per run; needs many runs).
* ``all``: every evaluation of every run.

The Chinchilla law uses every evaluation (``all``) or final points, since it models each
(N, D) pair, not only the efficient ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .curves import envelope, final_points, run_curves
from .fits import Fit, FitError, Ratio, compute_ratio, fit_chinchilla, fit_power_law
from .load import AnalysisError, Study

POINTS = ("envelope", "final", "all")


@dataclass
class ScalingResult:
    """Fits per method; a method whose fit refused is in ``refused`` with the reason."""

    flops: str
    points: str
    power: dict[str, Fit] = field(default_factory=dict)
    chinchilla: dict[str, Fit] = field(default_factory=dict)
    refused: dict[tuple[str, str], str] = field(default_factory=dict)  # (law, method) -> why
    data: dict[str, pd.DataFrame] = field(default_factory=dict)  # method -> fitted points
    target_loss: float | None = None
    ratios: dict[str, Ratio] = field(default_factory=dict)
    ratio_note: str = ""


def fit_points(study: Study, flops: str = "realised", points: str = "envelope") -> pd.DataFrame:
    if points not in POINTS:
        raise AnalysisError(f"points must be one of {', '.join(POINTS)}; got {points!r}")
    if points == "final":
        p = final_points(study, flops)
        return p.assign(step=np.nan)
    curves = run_curves(study, flops)
    return envelope(curves, "method") if points == "envelope" else curves


def fit_study(
    study: Study,
    flops: str = "realised",
    points: str = "envelope",
    n_boot: int = 200,
    level: float = 0.9,
    seed: int = 0,
    target_ppl: float | None = None,
    reference: str = "vanilla",
) -> ScalingResult:
    res = ScalingResult(flops, points)
    opts = {"n_boot": n_boot, "level": level, "seed": seed}
    # the bootstrap's unit is a run, named by its config hash rather than its random MLflow id,
    # and the points are put in the order of (config hash, step): the same runs imported into
    # another store (new run ids, another load order) give the same fits to the last digit
    trial = study.runs.set_index("run_id")["trial"]

    def stable(frame: pd.DataFrame) -> pd.DataFrame:
        keys = frame.assign(_trial=frame["run_id"].map(trial))
        keys = keys.sort_values(["_trial", "step", "flops", "val_loss"], kind="mergesort")
        return keys.drop(columns="_trial").reset_index(drop=True)

    pts = stable(fit_points(study, flops, points))
    every = stable(fit_points(study, flops, "final" if points == "final" else "all"))
    res.data = dict(iter(pts.groupby("method", sort=True)))
    laws = [
        (
            "power_law",
            res.power,
            pts,
            lambda g, what: fit_power_law(
                g["flops"], g["val_loss"], g["run_id"].map(trial), what, **opts
            ),
            "L(C) for {m} (" + points + " points)",
        ),
        (
            "chinchilla",
            res.chinchilla,
            every,
            lambda g, what: fit_chinchilla(
                g["params"], g["tokens"], g["val_loss"], g["run_id"].map(trial), what, **opts
            ),
            "L(N, D) for {m}",
        ),
    ]
    for law, fits, frame, fit, name in laws:
        for method, g in frame.groupby("method", sort=True):
            try:
                fits[method] = fit(g, name.format(m=method))
            except FitError as err:
                res.refused[(law, method)] = str(err)
    compute_ratios(res, pts, target_ppl, reference, level)
    return res


def compute_ratios(res: ScalingResult, pts: pd.DataFrame, target_ppl, reference: str, level: float):
    """Fill ``res.target_loss`` and each fitted method's compute ratio to ``reference`` there
    (or ``res.ratio_note`` when the reference has no fit)."""
    if reference not in res.power:
        why = "no runs" if reference not in res.data else "its fit refused"
        res.ratio_note = f"no compute ratios: the reference method {reference!r} has {why}"
        return
    if target_ppl is not None:
        res.target_loss = math.log(target_ppl)
    else:  # a loss every fitted method actually reached: no extrapolation along the curve
        best = pts[pts["method"].isin(list(res.power))].groupby("method")["val_loss"].min()
        res.target_loss = float(best.max())
    for method, fit in res.power.items():
        if method != reference:
            res.ratios[method] = compute_ratio(fit, res.power[reference], res.target_loss, level)


def params_table(fits: dict[str, Fit], names: list[str]) -> pd.DataFrame:
    """Point estimates with their bootstrap intervals, one row per method."""
    rows = []
    for method, f in fits.items():
        row = {"method": method, "points": f.n_points, "runs": f.n_runs}
        for n in names:
            lo, hi = f.interval.get(n, (np.nan, np.nan))
            row[n] = f.params[n]
            row[f"{n} low"] = lo
            row[f"{n} high"] = hi
        row["notes"] = "; ".join(f.notes)
        rows.append(row)
    return pd.DataFrame(rows)


def ratio_table(res: ScalingResult) -> pd.DataFrame:
    rows = []
    for method, r in res.ratios.items():
        lo, hi = r.interval or (np.nan, np.nan)
        rows.append(
            {
                "method": method,
                "target ppl": math.exp(r.target_loss),
                "compute": r.compute,
                "vanilla compute": r.reference_compute,
                "ratio to vanilla": r.ratio,
                "ratio low": lo,
                "ratio high": hi,
                "replicates unreachable": r.unreachable_frac,
            }
        )
    return pd.DataFrame(rows)
