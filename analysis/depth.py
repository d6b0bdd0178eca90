"""Depth diagnostics: how deep tokens go, how the halting penalties move that, and whether hard
tokens go deeper (METHOD.md section 5, claims 3 and 4)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from .curves import run_labels
from .load import Study


def depth_fractions(study: Study) -> pd.DataFrame:
    """Share of validation tokens at each executed depth (columns 0..l_max), one row per run
    with latent steps, from the final evaluation's ``val/depth_frac_k`` metrics."""
    r = study.runs
    cols = sorted(
        (c for c in r.columns if c.startswith("final/val/depth_frac_")),
        key=lambda c: int(c.rsplit("_", 1)[1]),
    )
    latent = r[(r["l_max"].fillna(0) > 0) & r[cols].notna().any(axis=1)] if cols else r.iloc[:0]
    out = latent[cols].rename(columns={c: int(c.rsplit("_", 1)[1]) for c in cols})
    out.index = latent["run_id"].map(run_labels(r)).to_numpy()
    out.index.name = "run"
    return out


def depth_vs_penalty(study: Study) -> pd.DataFrame:
    """Mean executed depth and perplexity of each adaptive run against lambda and beta."""
    r = study.runs[study.runs["method"] == "adaptive"]
    out = pd.DataFrame(
        {
            "size": r["size"],
            "lambda": r["lambda"],
            "beta": r["beta"],
            "l_max": r["l_max"],
            "mean_depth": r.get("final/val/mean_depth"),
            "val_ppl": np.exp(r["final/val/loss"].clip(upper=50.0)),
        }
    )
    return out.sort_values(["size", "beta", "lambda"], ignore_index=True)


def difficulty_correlation(study: Study) -> pd.DataFrame:
    """Per adaptive run: Spearman rank correlation between a token's difficulty (cross-entropy
    of its step-0 prediction) and its executed depth, over the sampled validation tokens."""
    td = study.token_depth()
    rows = []
    labels = run_labels(study.runs)
    for run_id, g in td.groupby("run_id", sort=False):
        if g["depth"].nunique() < 2:
            rho, p = np.nan, np.nan
        else:
            res = spearmanr(g["step0_loss"], g["depth"])
            rho, p = float(res.statistic), float(res.pvalue)
        q = g["step0_loss"].quantile([0.25, 0.75])
        rows.append(
            {
                "run": labels.get(run_id, run_id[:8]),
                "run_id": run_id,
                "tokens": len(g),
                "spearman_rho": rho,
                "p_value": p,
                "depth_easiest_quarter": g.loc[g["step0_loss"] <= q[0.25], "depth"].mean(),
                "depth_hardest_quarter": g.loc[g["step0_loss"] >= q[0.75], "depth"].mean(),
            }
        )
    return pd.DataFrame(rows)


def difficulty_bins(study: Study, n_bins: int = 10) -> pd.DataFrame:
    """Mean executed depth per difficulty decile (by step-0 loss), per run: run_id, bin,
    step0_loss (the bin's mean), depth (the bin's mean)."""
    td = study.token_depth()
    parts = []
    for run_id, g in td.groupby("run_id", sort=False):
        bins = pd.qcut(g["step0_loss"].rank(method="first"), n_bins, labels=False)
        m = g.groupby(bins).agg(step0_loss=("step0_loss", "mean"), depth=("depth", "mean"))
        m.insert(0, "run_id", run_id)
        parts.append(m.rename_axis("bin").reset_index())
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
