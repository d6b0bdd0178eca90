"""The study's claims (R1-R5 of docs/study/README.md) as tables, from a loaded
:class:`~alcot.analysis.load.Study`: one function per claim over the scores every claim shares
(:class:`Scores`: each run's test perplexity, the comparison runs at each method's own learning
rate, the seed noise), and the diagnostics that explain them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from .load import Study
from .study_constants import DEEP, GRAD_KEYS, OTHERS

# ------------------------------------------------------------------------------------ claims


def mark_variants(study: Study) -> Study:
    """Vanilla runs with more layers than their ladder size are the compute-matched larger
    vanilla: method ``vanilla-deep`` (in place; returns the study)."""
    from alcot.model.config import LADDER

    for frame in (study.runs, study.all_runs):
        ladder = frame["size"].map(lambda s: LADDER.get(s, {}).get("num_layers", np.nan))
        deep = (frame["method"] == "vanilla") & (frame["layers"] > ladder)
        frame.loc[deep, "method"] = DEEP
    return study


def test_corpus(runs: pd.DataFrame) -> str | None:
    """The corpus evaluated with ``alcot eval --text`` (``final/eval/<corpus>/ppl``)."""
    names = sorted(
        m[1] for c in runs.columns if (m := re.match(r"^final/eval/([^/]+)/ppl$", str(c)))
    )
    names = [n for n in names if not n.startswith("alcot_")]
    return names[0] if names else None


@dataclass
class Claims:
    corpus: str | None
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def ordered_sizes(values) -> list[str]:
    """The sizes present, smallest first (the ladder's order; unknown names after)."""
    from .plots import size_order as ordered

    return ordered(pd.Series(values).dropna().unique())


def own_rates(runs: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Each method's own learning rate (the one most of its runs use: a learning-rate search
    adds single runs at the others), and which runs are at it (or have none logged)."""
    rates = runs.groupby("method")["lr"].agg(_mode)
    at = runs["lr"].isna() | np.isclose(runs["lr"], runs["method"].map(rates).astype(float))
    return rates, at


def _mode(series: pd.Series):
    s = series.dropna()
    return s.mode().iloc[0] if not s.empty else np.nan


def _noise(main: pd.DataFrame, col: str, sizes: list[str]):
    """Pooled seed standard deviation of ``col`` (log test perplexity, say) over the groups
    of runs at ``sizes`` that differ only in their seed; (sd, degrees of freedom)."""
    sub = main[main["size"].isin(sizes)].dropna(subset=[col])
    keys = ["size", "method", "lambda", "beta", "final/tokens_seen", "layers"]
    ss, df = 0.0, 0
    for _, g in sub.groupby([sub[k].astype(str) for k in keys]):
        if g["seed"].nunique() > 1:
            v = g[col].to_numpy(float)
            ss += float(((v - v.mean()) ** 2).sum())
            df += len(v) - 1
    return (math.sqrt(ss / df), df) if df else (np.nan, 0)


def _compare(a: np.ndarray, b: np.ndarray, sd: float, df: int, level: float):
    """exp(mean log a - mean log b) with a t interval from the pooled seed noise ``sd`` of
    log values: (ratio, low, high)."""
    d = float(np.mean(np.log(a)) - np.mean(np.log(b)))
    if not df or not np.isfinite(sd):
        return math.exp(d), np.nan, np.nan
    se = sd * math.sqrt(1 / len(a) + 1 / len(b))
    t = stats.t.ppf(0.5 + level / 2, df)
    return math.exp(d), math.exp(d - t * se), math.exp(d + t * se)


def _verdict(lo: float, hi: float, lower: str, higher: str) -> str:
    if not np.isfinite(lo):
        return "no seed noise to judge"
    if hi < 1:
        return lower
    if lo > 1:
        return higher
    return "within seed noise"


@dataclass
class Scores:
    """What every claim reads: the runs with their scores (``r``: ``score`` is the test
    perplexity, validation where a run was not evaluated), the comparison runs at each method's
    own learning rate (``main``), adaptive's (at the default penalty: ``default``), the sizes
    (``seeded``: those with several seeds), and the seed noise (``sd`` of log perplexity, with
    ``dof`` degrees of freedom)."""

    r: pd.DataFrame
    corpus: str | None
    out: Claims
    main: pd.DataFrame
    sizes: list[str]
    seeded: list[str]
    sd: float
    dof: int
    adaptive: pd.DataFrame
    default: pd.DataFrame
    lrs: pd.Series
    at_lr: pd.Series
    level: float
    default_lambda: float
    default_beta: float
    n_boot: int
    seed: int


def fmt_runs(g):
    return len(g)


def claims(
    study: Study,
    scaling=None,
    level: float = 0.9,
    default_lambda: float = 0.01,
    default_beta: float = 1.0,
    n_boot: int = 1000,
    seed: int = 0,
) -> Claims:
    """The R1-R5 tables. Comparisons use the WikiText-2 test perplexity of ``alcot eval``
    (validation perplexity where a run was not evaluated); intervals come from the seeds:
    the pooled standard deviation of log perplexity over runs that differ only in their seed,
    at the sizes that have them, applied to every size's differences (a t interval)."""
    r = study.runs.copy()
    corpus = test_corpus(r)
    out = Claims(corpus)
    col = f"final/eval/{corpus}/ppl" if corpus else None
    r["ppl"] = np.exp(r["final/val/loss"].clip(upper=50.0))
    r["test_ppl"] = r[col] if col else np.nan
    r["score"] = r["test_ppl"] if col else r["ppl"]
    r["log_score"] = np.log(r["score"])
    missing = r.loc[r["score"].isna(), "trial"].tolist()
    if missing:
        out.notes.append(
            f"left out of the comparisons, not evaluated on {corpus}: {', '.join(missing)}"
        )
    # each method's comparison runs are at its own learning rate: the one most of its runs use
    # (a learning-rate search adds single runs at the other rates)
    lrs, at_lr = own_rates(r)
    main = r[at_lr & r["score"].notna()]
    shown = sorted({f"{v:g}" for v in lrs.dropna()})
    lr_note = (
        shown[0]
        if len(shown) == 1
        else "per method: " + ", ".join(f"{m} {v:g}" for m, v in lrs.dropna().items())
    )
    sizes = ordered_sizes(r["size"])
    seeded = [s for s in sizes if not np.isnan(_noise(main, "log_score", [s])[0])]
    sd, dof = _noise(main, "log_score", seeded) if seeded else (np.nan, 0)
    out.notes.append(
        f"learning rate of the comparisons: {lr_note}; scores: {'test' if corpus else 'validation'}"
        f" perplexity{f' ({corpus})' if corpus else ''}; seed noise (sd of log perplexity, "
        f"pooled at {', '.join(seeded) if seeded else '-'}): {sd:.4g} with {dof} degrees of freedom"
    )
    adaptive = main[main["method"] == "adaptive"]
    default = adaptive[
        np.isclose(adaptive["lambda"], default_lambda) & np.isclose(adaptive["beta"], default_beta)
    ]
    s = Scores(
        r,
        corpus,
        out,
        main,
        sizes,
        seeded,
        sd,
        dof,
        adaptive,
        default,
        lrs,
        at_lr,
        level,
        default_lambda,
        default_beta,
        n_boot,
        seed,
    )
    r1_adaptive_vs_vanilla(s)
    r2_isoflop(s)
    r3_penalty(s)
    r4_depth_difficulty(s, study)
    r5_fits(s, study, scaling)
    diagnostics(s)
    return out


def r1_adaptive_vs_vanilla(s: Scores) -> None:
    """R1: adaptive against vanilla at equal parameters and tokens."""
    out = s.out
    main = s.main
    sizes = s.sizes
    sd = s.sd
    dof = s.dof
    default = s.default
    level = s.level
    rows = []
    for size in sizes:
        a = default[default["size"] == size]
        van = main[(main["method"] == "vanilla") & (main["size"] == size)]
        if a.empty or van.empty:
            continue
        tokens = a["final/tokens_seen"].median()
        eq = van[np.isclose(van["final/tokens_seen"], tokens, rtol=0.05)]
        if eq.empty:
            continue
        ratio, lo, hi = _compare(a["score"].to_numpy(), eq["score"].to_numpy(), sd, dof, level)
        rows.append(
            {
                "size": size,
                "tokens": tokens,
                "adaptive runs": fmt_runs(a),
                "adaptive ppl": math.exp(a["log_score"].mean()),
                "vanilla runs": fmt_runs(eq),
                "vanilla ppl": math.exp(eq["log_score"].mean()),
                "ratio": ratio,
                "ratio low": lo,
                "ratio high": hi,
                "realised FLOPs ratio": a["final/flops/realised"].mean()
                / eq["final/flops/realised"].mean(),
                "verdict": _verdict(lo, hi, "adaptive lower", "vanilla lower"),
            }
        )
    out.tables["r1_equal_tokens"] = pd.DataFrame(rows)


def r2_isoflop(s: Scores) -> None:
    """R2: adaptive against every other method at the size's budget (isoFLOP)."""
    out = s.out
    main = s.main
    sizes = s.sizes
    sd = s.sd
    dof = s.dof
    default = s.default
    level = s.level
    rows = []
    for size in sizes:
        a = default[default["size"] == size]
        if a.empty:
            continue
        budget_tokens = a["final/tokens_seen"].median()
        van_all = main[(main["method"] == "vanilla") & (main["size"] == size)]
        for method in OTHERS:
            g = main[(main["method"] == method) & (main["size"] == size)]
            if method == "vanilla":  # the isoFLOP vanilla: the most tokens of its size
                g = g[np.isclose(g["final/tokens_seen"], van_all["final/tokens_seen"].max())]
            if g.empty:
                continue
            ratio, lo, hi = _compare(a["score"].to_numpy(), g["score"].to_numpy(), sd, dof, level)
            fr = a["final/flops/realised"].mean() / g["final/flops/realised"].mean()
            fn = a["final/flops/nominal"].mean() / g["final/flops/nominal"].mean()
            verdict = _verdict(lo, hi, "adaptive lower", f"{method} lower")
            rows.append(
                {
                    "size": size,
                    "versus": method,
                    "adaptive tokens": budget_tokens,
                    "versus tokens": g["final/tokens_seen"].median(),
                    "adaptive ppl": math.exp(a["log_score"].mean()),
                    "versus ppl": math.exp(g["log_score"].mean()),
                    "ratio": ratio,
                    "ratio low": lo,
                    "ratio high": hi,
                    "realised FLOPs ratio": fr,
                    "nominal FLOPs ratio": fn,
                    "verdict": verdict,
                }
            )
    out.tables["r2_matched_compute"] = pd.DataFrame(rows)


def r3_penalty(s: Scores) -> None:
    """R3: the halting penalty and beta against depth and cross-entropy."""
    out = s.out
    main = s.main
    seeded = s.seeded
    adaptive = s.adaptive
    pen = adaptive.groupby(["size", "beta", "lambda"], as_index=False).agg(
        runs=("run_id", "size"),
        mean_depth=("final/val/mean_depth", "mean"),
        val_ce=("final/val/loss", "mean"),
        test_ppl=("log_score", lambda v: math.exp(v.mean())),
    )
    pen = pen.sort_values(["size", "beta", "lambda"], ignore_index=True)
    out.tables["r3_penalties"] = pen
    rows = []
    for (size, beta), g in pen.groupby(["size", "beta"]):
        if g["lambda"].nunique() < 3:
            continue
        rd = stats.spearmanr(g["lambda"], g["mean_depth"]).statistic
        rc = stats.spearmanr(g["lambda"], g["val_ce"]).statistic
        rows.append(
            {
                "size": size,
                "effect of": "lambda",
                "at": f"beta={beta:g}",
                "settings": len(g),
                "depth change": g["mean_depth"].iloc[-1] - g["mean_depth"].iloc[0],
                "CE change": g["val_ce"].iloc[-1] - g["val_ce"].iloc[0],
                "spearman depth": rd,
                "spearman CE": rc,
            }
        )
    for size, g in pen.groupby("size"):
        betas = sorted(g["beta"].unique())
        if len(betas) < 2:
            continue
        lo_b, hi_b = betas[0], betas[-1]
        both = g.pivot_table(index="lambda", columns="beta", values=["mean_depth", "val_ce"])
        both = both.dropna()
        if both.empty:
            continue
        dd = both[("mean_depth", hi_b)] - both[("mean_depth", lo_b)]
        dc = both[("val_ce", hi_b)] - both[("val_ce", lo_b)]
        rows.append(
            {
                "size": size,
                "effect of": "beta",
                "at": f"beta {lo_b:g} -> {hi_b:g}, {len(both)} lambdas",
                "settings": len(both),
                "depth change": float(dd.mean()),
                "CE change": float(dc.mean()),
                "spearman depth": float((dd > 0).mean()),
                "spearman CE": float((dc < 0).mean()),
            }
        )
    out.tables["r3_directions"] = pd.DataFrame(rows)
    depth_sd, depth_df = (
        _noise(main.assign(d=main["final/val/mean_depth"]), "d", seeded) if seeded else (np.nan, 0)
    )
    ce_sd, _ = _noise(main.assign(c=main["final/val/loss"]), "c", seeded) if seeded else (np.nan, 0)
    out.notes.append(
        f"seed noise of an adaptive setting: sd of mean depth {depth_sd:.3g}, sd of validation "
        f"CE {ce_sd:.3g} ({depth_df} degrees of freedom)"
    )


def r4_depth_difficulty(s: Scores, study: Study) -> None:
    """R4: depth against token difficulty, per adaptive run."""
    r = s.r
    out = s.out
    level = s.level
    n_boot = s.n_boot
    seed = s.seed
    td = study.token_depth()
    rng = np.random.default_rng(seed)
    rows = []
    meta = r.set_index("run_id")
    for run_id, g in td.groupby("run_id", sort=False):
        if run_id not in meta.index:
            continue
        m = meta.loc[run_id]
        x, y = g["step0_loss"].to_numpy(float), g["depth"].to_numpy(float)
        rho = stats.spearmanr(x, y).statistic if len(np.unique(y)) > 1 else np.nan
        boots = []
        if np.isfinite(rho):
            for _ in range(n_boot):
                i = rng.integers(0, len(x), len(x))
                if len(np.unique(y[i])) > 1:
                    boots.append(stats.spearmanr(x[i], y[i]).statistic)
        lo, hi = (
            np.quantile(boots, [0.5 - level / 2, 0.5 + level / 2]) if boots else (np.nan, np.nan)
        )
        q1, q3 = np.quantile(x, [0.25, 0.75])
        l_max = int(m["l_max"]) if pd.notna(m["l_max"]) else None
        rows.append(
            {
                "size": m["size"],
                "lambda": m["lambda"],
                "beta": m["beta"],
                "seed": m["seed"],
                "lr": m["lr"],
                "tokens": len(g),
                "spearman": rho,
                "low": lo,
                "high": hi,
                "depth easiest quarter": y[x <= q1].mean(),
                "depth hardest quarter": y[x >= q3].mean(),
                "share at depth 0": m.get("final/val/depth_frac_0", np.nan),
                "share at l_max": m.get(f"final/val/depth_frac_{l_max}", np.nan)
                if l_max
                else np.nan,
            }
        )
    r4 = pd.DataFrame(rows)
    if not r4.empty:
        r4 = r4.sort_values(["size", "beta", "lambda", "lr", "seed"], ignore_index=True)
    out.tables["r4_depth_difficulty"] = r4


def r5_fits(s: Scores, study: Study, scaling) -> None:
    """R5: the fitted laws and compute ratios (from analysis.scaling)."""
    out = s.out
    level = s.level
    if scaling is not None:
        from .scaling import params_table, ratio_table

        if scaling.power:
            out.tables["r5_power_law"] = params_table(scaling.power, ["E", "A", "alpha"])
        out.tables["r5_compute_ratio"] = ratio_table(scaling)
        if scaling.power and "vanilla" in scaling.power:  # the level every fit reached
            import dataclasses

            from .scaling import compute_ratios, fit_points

            reached = dataclasses.replace(scaling, ratios={}, ratio_note="", target_loss=None)
            pts = fit_points(study, scaling.flops, scaling.points)
            compute_ratios(reached, pts, None, "vanilla", level)
            out.tables["r5_compute_ratio_reached"] = ratio_table(reached)
        if scaling.ratio_note:
            out.notes.append(scaling.ratio_note)
        for (law, method), why in sorted(scaling.refused.items()):
            out.notes.append(f"{law} not fitted for {method}: {why}")


def diagnostics(s: Scores) -> None:
    """Diagnostics: the adaptive loss's share of the training loss, gradients, learning rates."""
    r = s.r
    out = s.out
    default_lambda = s.default_lambda
    default_beta = s.default_beta
    lat = r[r["method"] == "adaptive"]
    if "final/train/adapt" in lat and "final/train/loss" in lat:
        share = lat["lambda"] * lat["final/train/adapt"] / lat["final/train/loss"]
        diag = pd.DataFrame(
            {
                "size": lat["size"],
                "lambda": lat["lambda"],
                "beta": lat["beta"],
                "seed": lat["seed"],
                "lr": lat["lr"],
                "train CE": lat.get("final/train/ce"),
                "adaptive loss": lat["final/train/adapt"],
                "share of training loss": share,
                "train mean depth": lat.get("final/train/mean_depth"),
            }
        ).sort_values(["size", "beta", "lambda", "lr", "seed"], ignore_index=True)
        out.tables["diag_adaptive_loss"] = diag
    grad = [f"final/diag/grad/{k}" for k in GRAD_KEYS]
    with_grad = lat[lat[grad[0]].notna()] if grad[0] in lat else lat.iloc[:0]
    if not with_grad.empty:
        diag = with_grad[["size", "lambda", "beta", "seed", "lr"]].copy()
        for k, c in zip(GRAD_KEYS, grad, strict=True):
            diag[k.replace("_", " ")] = with_grad.get(c)
        out.tables["diag_gradient_share"] = diag.sort_values(
            ["size", "beta", "lambda", "lr", "seed"], ignore_index=True
        )
    if r["lr"].nunique() > 1:  # every method at its size's budget (adaptive: default penalty)
        scored = r[r["score"].notna()]
        top = scored.groupby(["method", "size"])["final/tokens_seen"].transform("max")
        at_budget = scored[np.isclose(scored["final/tokens_seen"], top)]
        is_ada = at_budget["method"] == "adaptive"
        default_penalty = np.isclose(at_budget["lambda"], default_lambda) & np.isclose(
            at_budget["beta"], default_beta
        )
        pick = at_budget[~is_ada | default_penalty]
        lr_runs = pick.groupby(["method", "size", "lr"], as_index=False).agg(
            runs=("run_id", "size"),
            test_ppl=("log_score", lambda v: math.exp(v.mean())),
            mean_depth=("final/val/mean_depth", "mean"),
        )
        swept = lr_runs.groupby(["method", "size"])["lr"].transform("nunique") > 1
        out.tables["diag_learning_rate"] = lr_runs[swept].reset_index(drop=True)
