"""Perplexity against training compute: final points, Pareto fronts, compute-efficient
envelopes, and curves compared at matched FLOPs.

Compute is *realised* FLOPs (what the run executed: halted tokens cost nothing), *nominal* FLOPs
(6 N per executed pass with N the non-embedding parameters, Kaplan's accounting) or *paper*
FLOPs (6 N_total per executed pass, every parameter counted: the convention of the paper's
table, so its 2.18e20 for vanilla 1.4B on 26B tokens can be set beside ours); ``flops`` switches
between them. The study's question is about realised compute, so that is the default.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .load import AnalysisError, Study

FLOPS_KINDS = ("realised", "nominal", "paper")


def flops_column(kind: str) -> str:
    if kind not in FLOPS_KINDS:
        raise AnalysisError(f"flops must be one of {', '.join(FLOPS_KINDS)}; got {kind!r}")
    return f"flops_{kind}"


def label(row) -> str:
    """A short name for a run configuration: ``adaptive tiny λ=0.01``."""
    text = f"{row['method']} {row['size']}"
    if row["method"] == "adaptive" and pd.notna(row.get("lambda")):
        text += f" λ={row['lambda']:g}"
    return text


_DISAMBIGUATE = [
    ("params", "N={:.3g}"),
    ("l_max", "L={:g}"),
    ("beta", "β={:g}"),
    ("tau", "τ={:g}"),
    ("seed", "seed {:g}"),
    ("lr", "lr={:g}"),
    ("final/tokens_seen", "D={:.3g}"),
]


def run_labels(runs: pd.DataFrame) -> pd.Series:
    """Labels by run_id, unique per configuration: where runs share a short label (shapes
    overridden under one size name, several seeds, other betas), the fields that differ among
    them are appended."""
    base = runs.apply(label, axis=1)
    out = base.copy()
    for _, idx in base.groupby(base).groups.items():
        if len(idx) < 2:
            continue
        group = runs.loc[idx]
        for col, pattern in _DISAMBIGUATE:
            if col in group and group[col].nunique(dropna=True) > 1:
                out.loc[idx] = [
                    f"{o} {pattern.format(v)}" if pd.notna(v) else o
                    for o, v in zip(out.loc[idx], group[col], strict=True)
                ]
    return pd.Series(out.to_numpy(), index=runs["run_id"].to_numpy())


def final_points(study: Study, flops: str = "realised") -> pd.DataFrame:
    """One row per finished run: its configuration and where it ended (compute, perplexity)."""
    r = study.runs
    col = f"final/flops/{flops}"
    flops_column(flops)
    if col not in r:
        raise AnalysisError(f"no run logged flops/{flops}")
    cols = ["run_id", "trial", "method", "size", "params", "l_max", "lambda", "beta", "tau", "seed"]
    out = r.reindex(columns=cols).copy()
    out["flops"] = r[col]
    out["val_loss"] = r["final/val/loss"]
    out["val_ppl"] = np.exp(out["val_loss"].clip(upper=50.0))
    out["tokens"] = r.get("final/tokens_seen")
    out["mean_depth"] = r.get("final/val/mean_depth")
    out["label"] = out["run_id"].map(run_labels(r))
    return out.sort_values(["method", "size", "flops"], ignore_index=True)


def pareto_front(points: pd.DataFrame, x: str = "flops", y: str = "val_ppl") -> pd.DataFrame:
    """The non-dominated points (no other point has both lower ``x`` and lower ``y``), sorted
    by ``x``: the best perplexity each compute level can buy."""
    ordered = points.dropna(subset=[x, y]).sort_values([x, y])
    keep, best = [], np.inf
    for idx, val in zip(ordered.index, ordered[y], strict=True):
        if val < best:
            keep.append(idx)
            best = val
    return ordered.loc[keep]


def run_curves(study: Study, flops: str = "realised") -> pd.DataFrame:
    """Evaluations joined with their run's configuration: run_id, method, size, lambda, beta,
    params, step, tokens, flops, val_loss, val_ppl."""
    col = flops_column(flops)
    if col not in study.curves or study.curves[col].isna().all():
        raise AnalysisError(f"no run logged flops/{flops} (runs older than the counter lack it)")
    c = study.curves.dropna(subset=[col]).rename(columns={col: "flops"})
    meta = study.runs[["run_id", "method", "size", "params", "lambda", "beta"]]
    c = c.merge(meta, on="run_id")
    c["label"] = c["run_id"].map(run_labels(study.runs))
    return c[
        ["run_id", "label", "method", "size", "params", "lambda", "beta", "step", "tokens"]
        + ["flops", "val_loss", "val_ppl"]
    ]


def envelope(curves: pd.DataFrame, by: str = "method") -> pd.DataFrame:
    """Per group, the evaluation points on its compute-efficient frontier: the lowest loss
    reached at or below each compute level by any of the group's runs."""
    parts = [pareto_front(g, "flops", "val_loss") for _, g in curves.groupby(by, sort=True)]
    return pd.concat(parts) if parts else curves.iloc[:0]


def interpolate(run: pd.DataFrame, grid: np.ndarray, carry: bool = False) -> np.ndarray:
    """A run's loss at compute levels ``grid``, linear in log compute between evaluations, NaN
    before its first one. Past its last evaluation: NaN, or with ``carry`` the best loss it
    reached (a budget larger than the run spent could have bought at least that)."""
    run = run.sort_values("flops")
    x, y = np.log(run["flops"].to_numpy()), run["val_loss"].to_numpy()
    out = np.interp(np.log(grid), x, y)
    out[grid < run["flops"].min()] = np.nan
    out[grid > run["flops"].max()] = np.min(y) if carry else np.nan
    return out


def matched_levels(curves: pd.DataFrame, n: int = 5, by: str = "method") -> np.ndarray:
    """``n`` log-spaced compute levels inside the range every group reached (the overlap), so
    each group is compared at compute it actually spent, never extrapolated."""
    lo = max(g["flops"].min() for _, g in curves.groupby(by))
    hi = min(g["flops"].max() for _, g in curves.groupby(by))
    if not hi > lo:
        raise AnalysisError(
            f"the {by}s' compute ranges do not overlap; no matched-FLOPs comparison is possible"
        )
    return np.geomspace(lo, hi, n)


def at_matched_flops(
    curves: pd.DataFrame, levels: np.ndarray, by: list[str] | str = "label", carry: bool = False
) -> pd.DataFrame:
    """Validation perplexity of each group at each compute level (columns), the best of the
    group's runs there; NaN where none of its runs covered that level. With ``carry``, a run
    that finished below a level counts with its best loss: the best perplexity the group
    reached within that budget (use it to compare methods across sizes)."""
    by = [by] if isinstance(by, str) else list(by)
    rows = {}
    for key, g in curves.groupby(by, sort=True, dropna=False):
        losses = np.vstack([interpolate(r, levels, carry) for _, r in g.groupby("run_id")])
        with np.errstate(all="ignore"):
            best = np.where(
                np.isnan(losses).all(0),
                np.nan,
                np.nanmin(np.where(np.isnan(losses), np.inf, losses), axis=0),
            )
        rows[key if len(by) > 1 else key[0]] = np.exp(best)
    table = pd.DataFrame.from_dict(rows, orient="index", columns=[f"{c:.3g}" for c in levels])
    if len(by) > 1:
        table.index = pd.MultiIndex.from_tuples(table.index, names=by)
    else:
        table.index.name = by[0]
    return table
