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
    for _, g in sub.groupby([sub[k].astype(str) for k in keys], dropna=False):
        if g["seed"].nunique() > 1:
            v = g[col].to_numpy(float)
            ss += float(((v - v.mean()) ** 2).sum())
            df += len(v) - 1
    return (math.sqrt(ss / df), df) if df else (np.nan, 0)


def _compare(a: np.ndarray, b: np.ndarray, sd: float, df: int, level: float) -> dict:
    """exp(mean log a - mean log b) with a t interval from the seed noise ``sd`` of log values
    (``df`` degrees of freedom) and the two-sided p-value of "no difference"."""
    d = float(np.mean(np.log(a)) - np.mean(np.log(b)))
    out = {"ratio": math.exp(d), "ratio low": np.nan, "ratio high": np.nan}
    out.update({"seed sd": sd, "dof": df, "se": np.nan, "p": np.nan})
    if not df or not np.isfinite(sd):
        return out
    se = sd * math.sqrt(1 / len(a) + 1 / len(b))
    t = stats.t.ppf(0.5 + level / 2, df)
    out.update({"ratio low": math.exp(d - t * se), "ratio high": math.exp(d + t * se)})
    out.update({"se": se, "p": float(2 * stats.t.sf(abs(d) / se, df)) if se > 0 else np.nan})
    return out


def _verdict(row, lower: str, higher: str, alpha: float) -> str:
    """The verdict of a comparison from its Holm-corrected p-value."""
    if not np.isfinite(row["p holm"]):
        return "no seed noise to judge"
    if row["p holm"] >= alpha:
        return "tie: no difference after Holm"
    return lower if row["ratio"] < 1 else higher


def _judge(tables: list[pd.DataFrame], alpha: float) -> None:
    """Holm's correction over every comparison of ``tables`` together (one family: the R1 and
    R2 verdicts), in place: ``p holm`` and ``verdict`` (rows with a ``verdict`` already set,
    such as a comparator whose rate was not searched, stay out of the family)."""
    from .token_multiple import holm

    family = [
        (t, i)
        for t in tables
        for i in t.index
        if np.isfinite(t.at[i, "p"]) and not t.at[i, "verdict"]
    ]
    adjusted = holm([t.at[i, "p"] for t, i in family]) if family else []
    for t in tables:
        if not t.empty:
            t["p holm"] = np.nan
    for (t, i), q in zip(family, adjusted, strict=True):
        t.at[i, "p holm"] = q
    for t in tables:
        for i in t.index:
            if not t.at[i, "verdict"]:
                versus = t.at[i, "versus"]
                t.at[i, "verdict"] = _verdict(t.loc[i], "adaptive lower", f"{versus} lower", alpha)


@dataclass
class Scores:
    """What every claim reads: the runs with their scores (``r``: ``score`` is the test
    perplexity, validation where a run was not evaluated), the comparison runs at each method's
    own learning rate (``main``), adaptive's (at the default penalty: ``default``), the sizes,
    and each size's own seed noise (``noise``: size -> (sd of log perplexity, degrees of
    freedom), pooled over that size's groups of runs that differ only in their seed)."""

    r: pd.DataFrame
    corpus: str | None
    out: Claims
    main: pd.DataFrame
    sizes: list[str]
    noise: dict[str, tuple[float, int]]
    adaptive: pd.DataFrame
    default: pd.DataFrame
    lrs: pd.Series
    searched: set[str]
    level: float
    default_lambda: float
    default_beta: float
    n_boot: int
    seed: int


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
    (validation perplexity where a run was not evaluated); each size's comparisons have that
    size's own seed noise (the pooled standard deviation of log perplexity over its runs that
    differ only in their seed: a t interval and p-value), and the R1 and R2 verdicts are
    Holm-corrected together."""
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
    searched = {m for m, n in r.groupby("method")["lr"].nunique().items() if n > 1}
    main = r[at_lr & r["score"].notna()]
    shown = sorted({f"{v:g}" for v in lrs.dropna()})
    lr_note = (
        shown[0]
        if len(shown) == 1
        else "per method: " + ", ".join(f"{m} {v:g}" for m, v in lrs.dropna().items())
    )
    sizes = ordered_sizes(r["size"])
    noise = {size: _noise(main, "log_score", [size]) for size in sizes}
    shown_noise = "; ".join(f"{size} {sd:.3g} ({df} dof)" for size, (sd, df) in noise.items() if df)
    out.notes.append(
        f"learning rate of the comparisons: {lr_note}; scores: {'test' if corpus else 'validation'}"
        f" perplexity{f' ({corpus})' if corpus else ''}; seed noise per size (sd of log "
        f"perplexity pooled over that size's groups with several seeds, also assumed for its "
        f"single-seed comparators, whose own noise is unknown): {shown_noise or '-'}; R1 and R2 "
        f"verdicts are Holm-corrected together at the {1 - level:g} level"
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
        noise,
        adaptive,
        default,
        lrs,
        searched,
        level,
        default_lambda,
        default_beta,
        n_boot,
        seed,
    )
    r1 = r1_adaptive_vs_vanilla(s)
    r2 = r2_isoflop(s)
    _judge([r1, r2], 1 - level)
    for name, table in (("r1_equal_tokens", r1), ("r2_matched_compute", r2)):
        if not table.empty:
            table = table[[c for c in table.columns if c != "verdict"] + ["verdict"]]
        out.tables[name] = table
    r1_trend(s, r1)
    r3_penalty(s)
    r4_depth_difficulty(s, study)
    r5_fits(s, study, scaling)
    cells(s)
    diagnostics(s)
    return out


def _row(s: Scores, size: str, a: pd.DataFrame, g: pd.DataFrame) -> dict:
    """The comparison columns of adaptive's runs ``a`` against ``g`` at ``size``: runs and
    geometric-mean perplexities of each, the ratio with its interval and p-value at the size's
    seed noise, and the realised and nominal FLOPs ratios."""
    sd, dof = s.noise.get(size, (np.nan, 0))
    return {
        "adaptive runs": len(a),
        "adaptive ppl": math.exp(a["log_score"].mean()),
        "versus runs": len(g),
        "versus ppl": math.exp(g["log_score"].mean()),
        **_compare(a["score"].to_numpy(), g["score"].to_numpy(), sd, dof, s.level),
        "realised FLOPs ratio": a["final/flops/realised"].mean() / g["final/flops/realised"].mean(),
        "nominal FLOPs ratio": a["final/flops/nominal"].mean() / g["final/flops/nominal"].mean(),
        "verdict": "",
    }


def r1_adaptive_vs_vanilla(s: Scores) -> pd.DataFrame:
    """R1: adaptive against vanilla at equal parameters and tokens."""
    rows = []
    for size in s.sizes:
        a = s.default[s.default["size"] == size]
        van = s.main[(s.main["method"] == "vanilla") & (s.main["size"] == size)]
        if a.empty or van.empty:
            continue
        tokens = a["final/tokens_seen"].median()
        eq = van[np.isclose(van["final/tokens_seen"], tokens, rtol=0.05)]
        if eq.empty:
            continue
        rows.append({"size": size, "versus": "vanilla", "tokens": tokens, **_row(s, size, a, eq)})
    return pd.DataFrame(rows)


def r1_trend(s: Scores, r1: pd.DataFrame) -> None:
    """Does R1's ratio move between the smallest and the largest size? (A t test of the
    difference of the two log ratios, each at its own size's noise.)"""
    ok = r1[np.isfinite(r1["se"])] if not r1.empty else r1
    if len(ok) < 2:
        return
    first, last = ok.iloc[0], ok.iloc[-1]
    d = math.log(first["ratio"]) - math.log(last["ratio"])
    se = math.hypot(first["se"], last["se"])
    dof = int(first["dof"] + last["dof"])
    t = d / se
    p = float(2 * stats.t.sf(abs(t), dof))
    s.out.notes.append(
        f"R1's ratio from {first['size']} to {last['size']}: {first['ratio']:.4g} -> "
        f"{last['ratio']:.4g}, t = {t:.3g} with {dof} dof, p = {p:.2g} (two-sided, uncorrected)"
    )


def r2_isoflop(s: Scores) -> pd.DataFrame:
    """R2: adaptive against every other method at the size's budget (isoFLOP). Where the study
    searched learning rates, a comparator whose rate was not searched (it has runs at one rate
    only) is shown but not judged."""
    rows = []
    for size in s.sizes:
        a = s.default[s.default["size"] == size]
        if a.empty:
            continue
        budget_tokens = a["final/tokens_seen"].median()
        van_all = s.main[(s.main["method"] == "vanilla") & (s.main["size"] == size)]
        for method in OTHERS:
            g = s.main[(s.main["method"] == method) & (s.main["size"] == size)]
            if method == "vanilla":  # the isoFLOP vanilla: the most tokens of its size
                g = g[np.isclose(g["final/tokens_seen"], van_all["final/tokens_seen"].max())]
            if g.empty:
                continue
            row = {
                "size": size,
                "versus": method,
                "adaptive tokens": budget_tokens,
                "versus tokens": g["final/tokens_seen"].median(),
                "versus rate searched": method in s.searched,
                **_row(s, size, a, g),
            }
            if s.searched and method not in s.searched:  # others had a search, it had none
                row["verdict"] = "not judged: its learning rate was not searched"
            rows.append(row)
    return pd.DataFrame(rows)


def r3_penalty(s: Scores) -> None:
    """R3: the halting penalty and beta against depth and cross-entropy. The directions are
    read at matched seeds (the smallest seed every setting has), and each change is also
    given in units of adaptive's own seed noise (groups of adaptive runs that differ only in
    their seed, at every size that has them)."""
    out = s.out
    adaptive = s.adaptive
    sizes = [z for z in s.sizes if _noise(adaptive, "log_score", [z])[1]]
    depth_sd, depth_df = _noise(adaptive.assign(d=adaptive["final/val/mean_depth"]), "d", sizes)
    ce_sd, _ = _noise(adaptive.assign(c=adaptive["final/val/loss"]), "c", sizes)
    keys = ["size", "beta", "lambda"]
    pen = adaptive.groupby(keys, as_index=False).agg(
        runs=("run_id", "size"),
        mean_depth=("final/val/mean_depth", "mean"),
        val_ce=("final/val/loss", "mean"),
        test_ppl=("log_score", lambda v: math.exp(v.mean())),
    )
    # the matched seed: the smallest seed that every setting of the size has
    matched = {}
    for size, g in adaptive.groupby("size"):
        per = [set(x["seed"]) for _, x in g.groupby(["beta", "lambda"])]
        both = set.intersection(*per) if per else set()
        if both:
            matched[size] = min(both)
    at_seed = adaptive[adaptive["size"].map(matched) == adaptive["seed"]]
    first = at_seed.groupby(keys, as_index=False).agg(
        matched_seed=("seed", "first"),
        depth_at_seed=("final/val/mean_depth", "mean"),
        ce_at_seed=("final/val/loss", "mean"),
    )
    pen = pen.merge(first, on=keys, how="left")
    pen = pen.sort_values(keys, ignore_index=True)
    out.tables["r3_penalties"] = pen
    rows = []
    for (size, beta), g in pen.groupby(["size", "beta"]):
        if g["lambda"].nunique() < 3:
            continue
        depth, ce = g["depth_at_seed"], g["ce_at_seed"]
        rows.append(
            {
                "size": size,
                "effect of": "lambda",
                "at": f"beta={beta:g}",
                "seed": g["matched_seed"].iloc[0],
                "settings": len(g),
                "depth change": depth.iloc[-1] - depth.iloc[0],
                "depth change / seed sd": (depth.iloc[-1] - depth.iloc[0]) / depth_sd,
                "CE change": ce.iloc[-1] - ce.iloc[0],
                "CE change / seed sd": (ce.iloc[-1] - ce.iloc[0]) / ce_sd,
                "spearman depth": stats.spearmanr(g["lambda"], depth).statistic,
                "spearman CE": stats.spearmanr(g["lambda"], ce).statistic,
                "lambdas with more depth": np.nan,
            }
        )
    for size, g in pen.groupby("size"):
        betas = sorted(g["beta"].unique())
        if len(betas) < 2:
            continue
        lo_b, hi_b = betas[0], betas[-1]
        both = g.pivot_table(index="lambda", columns="beta", values=["depth_at_seed", "ce_at_seed"])
        both = both.dropna()
        if both.empty:
            continue
        dd = both[("depth_at_seed", hi_b)] - both[("depth_at_seed", lo_b)]
        dc = both[("ce_at_seed", hi_b)] - both[("ce_at_seed", lo_b)]
        rows.append(
            {
                "size": size,
                "effect of": "beta",
                "at": f"beta {lo_b:g} -> {hi_b:g}, {len(both)} lambdas",
                "seed": g["matched_seed"].iloc[0],
                "settings": len(both),
                "depth change": float(dd.mean()),
                "depth change / seed sd": float(dd.mean()) / depth_sd,
                "CE change": float(dc.mean()),
                "CE change / seed sd": float(dc.mean()) / ce_sd,
                "spearman depth": np.nan,
                "spearman CE": np.nan,
                "lambdas with more depth": int((dd > 0).sum()),
            }
        )
    out.tables["r3_directions"] = pd.DataFrame(rows)
    out.notes.append(
        f"seed noise of an adaptive setting (adaptive runs only, at {', '.join(sizes) or '-'}): "
        f"sd of mean depth {depth_sd:.3g}, sd of validation CE {ce_sd:.3g} ({depth_df} degrees "
        "of freedom); R3's directions are read at the matched seed"
    )


def spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho of each row of ``x`` with the same row of ``y`` (average ranks for ties,
    as ``scipy.stats.spearmanr``): one call for a whole bootstrap instead of one per replicate."""
    rx, ry = stats.rankdata(x, axis=1), stats.rankdata(y, axis=1)
    rx -= rx.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    return (rx * ry).sum(axis=1) / np.sqrt((rx * rx).sum(axis=1) * (ry * ry).sum(axis=1))


def r4_depth_difficulty(s: Scores, study: Study) -> None:
    """R4: depth against token difficulty, per adaptive run, and per Mixture-of-Recursions run
    (whose router also chooses a depth per token) for comparison."""
    r = s.r
    out = s.out
    level = s.level
    n_boot = s.n_boot
    seed = s.seed
    td = study.token_depth(("adaptive", "mor"))
    rng = np.random.default_rng(seed)
    rows = []
    meta = r.set_index("run_id")
    for run_id, g in td.groupby("run_id", sort=False):
        if run_id not in meta.index:
            continue
        m = meta.loc[run_id]
        x, y = g["step0_loss"].to_numpy(float), g["depth"].to_numpy(float)
        rho = stats.spearmanr(x, y).statistic if len(np.unique(y)) > 1 else np.nan
        boots = np.empty(0)
        if np.isfinite(rho) and n_boot:
            # the replicates drawn one by one, as before; scored together (a row each)
            i = np.stack([rng.integers(0, len(x), len(x)) for _ in range(n_boot)])
            xs, ys = x[i], y[i]
            varied = ys.max(axis=1) > ys.min(axis=1)  # a constant depth has no rank order
            boots = spearman_rows(xs[varied], ys[varied])
        lo, hi = (
            np.quantile(boots, [0.5 - level / 2, 0.5 + level / 2])
            if len(boots)
            else (np.nan, np.nan)
        )
        q1, q3 = np.quantile(x, [0.25, 0.75])
        l_max = int(m["l_max"]) if pd.notna(m["l_max"]) else None
        rows.append(
            {
                "size": m["size"],
                "method": m["method"],
                "lambda": m["lambda"] if m["method"] == "adaptive" else np.nan,
                "beta": m["beta"] if m["method"] == "adaptive" else np.nan,
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
        r4 = r4.sort_values(["size", "method", "beta", "lambda", "lr", "seed"], ignore_index=True)
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


def cells(s: Scores) -> None:
    """What a reader needs beside the verdicts, per cell (size, method, layers, penalty,
    tokens, learning rate): the runs and seeds behind it, optimizer and warm-up steps, the
    validation set's size, validation and test perplexity and their ratio, whether the seeds
    rank the same on both, and, for adaptive, how the seeds' depth goes with their score."""
    r = s.r.copy()
    r.loc[r["method"] != "adaptive", ["lambda", "beta"]] = np.nan  # no halting penalty there
    # the trainer's rule (model/trainer.py warmup_count): warmup_steps when set, else
    # warmup_frac x steps rounded (at least one), none when both are 0
    fixed, frac = r["warmup_steps"].fillna(0), r["warmup_frac"].fillna(0)
    by_frac = np.where(frac > 0, np.maximum(1, np.round(frac * r["steps"])), 0)
    r["warmup"] = np.where(fixed > 0, np.minimum(fixed, r["steps"]), by_frac)
    r["val_tokens"] = r["eval_batches"] * r["batch_size"] * r["seq_len"]
    r["log_val"] = np.log(r["ppl"])
    keys = ["size", "method", "layers", "lambda", "beta", "final/tokens_seen", "lr"]
    rows = []
    for _, g in r.groupby([r[k].astype(str) for k in keys], sort=False, dropna=False):
        g = g.sort_values("seed")
        row = {k: g[k].iloc[0] for k in keys}
        tested = bool(g["test_ppl"].notna().all())
        method = g["method"].iloc[0]
        row.update(
            {
                "own rate": bool(np.isclose(g["lr"].iloc[0], s.lrs.get(method, np.nan))),
                "runs": len(g),
                "seeds": " ".join(f"{v:g}" for v in g["seed"]),
                "steps": g["steps"].iloc[0],
                "warm-up steps": g["warmup"].iloc[0],
                "validation tokens": g["val_tokens"].iloc[0],
                "val ppl": math.exp(g["log_val"].mean()),
                "test ppl": math.exp(g["log_score"].mean()) if tested else np.nan,
                "test / val": math.exp(g["log_score"].mean() - g["log_val"].mean())
                if tested
                else np.nan,
                "mean depth": g["final/val/mean_depth"].mean(),
                "realised FLOPs per token": (
                    g["final/flops/realised"] / g["final/tokens_seen"]
                ).mean(),
                "same seed order on val and test": (
                    bool((g["log_val"].rank() == g["log_score"].rank()).all())
                    if len(g) > 1 and tested
                    else None
                ),
                "spearman seed depth vs test ppl": (
                    stats.spearmanr(g["final/val/mean_depth"], g["log_score"]).statistic
                    if len(g) > 2 and g["final/val/mean_depth"].nunique() > 1
                    else np.nan
                ),
            }
        )
        rows.append(row)
    table = pd.DataFrame(rows).rename(columns={"final/tokens_seen": "tokens"})
    order = {z: i for i, z in enumerate(s.sizes)}
    table = table.sort_values(
        ["size", "method", "layers", "lambda", "beta", "tokens", "lr"],
        key=lambda c: c.map(order) if c.name == "size" else c,
        ignore_index=True,
    )
    s.out.tables["cells"] = table


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
