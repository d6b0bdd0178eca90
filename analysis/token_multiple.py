"""The token multiple G: how many vanilla tokens buy a method's quality, size by size, against R,
what the method's tokens cost in realised compute (sweeps/study_tokens.yaml, docs/study).

Per size (ladder size x layers), D is the method's training tokens. Vanilla trains at D, 1.5 D
and 2 D; for each seed s, a least-squares line through vanilla's (log tokens, log test
perplexity) points gives the vanilla tokens T_s at which vanilla reaches the method's seed-s
perplexity, and G_s = T_s / D (the same seed of both: seed s of every arm shares its data order
and initialisation stream). **R** is the method's realised training FLOPs per token over
vanilla's at D (output layer included). A method wins at equal realised compute exactly when
G > R: vanilla would need more compute (G x D tokens at vanilla's cost) to match it than it
spent (R x vanilla's cost at D). No floor is fitted and nothing is extrapolated silently: a G
outside [1, 2] (outside vanilla's tokens) is flagged.

G's interval is a t interval of log G_s over the size's own seeds (its own noise, not a pooled
one). The verdict tests log G = log R with a one-sample t test per (size, arm); the p values of
each arm across sizes are Holm-corrected, and a verdict is drawn only where the corrected p is
below 1 - level.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

ARM_KEYS = ["size", "layers", "method", "lambda"]


def _arm_rates(runs: pd.DataFrame) -> pd.DataFrame:
    """Each arm's runs at its own learning rate: the rate most of its runs use (a learning-rate
    search adds seed-0 runs at the others)."""
    key = [*ARM_KEYS, "tokens"]
    counts = runs.groupby([*key, "lr"], dropna=False).size().rename("n").reset_index()
    counts = counts.sort_values([*key, "n", "lr"], ascending=[True] * len(key) + [False, True])
    best = counts.drop_duplicates(key)[[*key, "lr"]]
    return runs.merge(best, on=[*key, "lr"])


def holm(p: list[float]) -> list[float]:
    """Holm-adjusted p-values (step-down, monotone), in the order given."""
    order = np.argsort(p)
    out = [math.nan] * len(p)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        out[i] = running
    return out


def token_multiples(runs: pd.DataFrame, score: str, level: float = 0.9) -> pd.DataFrame:
    """One row per (size, arm other than vanilla) of a study with vanilla at three or more token
    counts at that size; empty when the study has no such design. ``score``: the column of the
    test perplexity (``final/eval/<corpus>/ppl``)."""
    r = runs.dropna(subset=[score]).copy()
    # sizes are (ladder size, layers) here: a vanilla with more layers than its ladder size,
    # which the claims call vanilla-deep, is this size's vanilla
    r["method"] = r["method"].replace({"vanilla-deep": "vanilla"})
    r["lambda"] = r["lambda"].where(r["method"] == "adaptive")
    r["tokens"] = r["final/tokens_seen"]
    r["log_score"] = np.log(r[score])
    r["flops_per_token"] = r["final/flops/realised"] / r["tokens"]
    r = _arm_rates(r)
    rows = []
    for (size, layers), g in r.groupby(["size", "layers"], sort=False):
        van = g[g["method"] == "vanilla"]
        if van["tokens"].nunique() < 3:
            continue
        d_van = van["tokens"].min()
        cost_van = van.loc[van["tokens"] == d_van, "flops_per_token"].mean()
        fits = {}
        for seed, v in van.groupby("seed"):
            if v["tokens"].nunique() >= 2:
                b, a = np.polyfit(np.log(v["tokens"]), v["log_score"], 1)
                fits[seed] = (a, b)
        for key, arm in g[g["method"] != "vanilla"].groupby(["method", "lambda"], dropna=False):
            d = arm["tokens"].mean()
            logs = []
            for _, run in arm.iterrows():
                if run["seed"] in fits:
                    a, b = fits[run["seed"]]
                    logs.append((run["log_score"] - a) / b - math.log(d))
            if not logs:
                continue
            logs = np.array(logs)
            n = len(logs)
            big_r = arm["flops_per_token"].mean() / cost_van
            mean = float(logs.mean())
            if n > 1:
                se = float(logs.std(ddof=1)) / math.sqrt(n)
                half = stats.t.ppf(0.5 + level / 2, n - 1) * se
                t = (mean - math.log(big_r)) / se if se > 0 else math.inf
                p = float(2 * stats.t.sf(abs(t), n - 1))
            else:
                half, p = math.nan, math.nan
            rows.append(
                {
                    "size": size,
                    "layers": int(layers),
                    "N": int(van["params"].iloc[0]),
                    "arm": key[0] if pd.isna(key[1]) else f"{key[0]} lambda={key[1]:g}",
                    "method": key[0],
                    "lambda": key[1],
                    "seeds": n,
                    "D": int(round(d)),
                    "vanilla_tokens": "/".join(
                        f"{t / d:.2g}" for t in sorted(van["tokens"].unique())
                    ),
                    "R": big_r,
                    "G": math.exp(mean),
                    "G_low": math.exp(mean - half) if n > 1 else math.nan,
                    "G_high": math.exp(mean + half) if n > 1 else math.nan,
                    "G_over_R": math.exp(mean) / big_r,
                    "p": p,
                    "extrapolated": bool(((np.exp(logs) < 1) | (np.exp(logs) > 2)).any()),
                }
            )
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    out["p_holm"] = math.nan
    for _, idx in out.groupby("arm").groups.items():
        ps = out.loc[idx, "p"].tolist()
        ok = [i for i, v in zip(idx, ps, strict=True) if not math.isnan(v)]
        if ok:
            out.loc[ok, "p_holm"] = holm([out.loc[i, "p"] for i in ok])
    alpha = 1 - level

    def verdict(row) -> str:
        if math.isnan(row["p_holm"]) or row["p_holm"] >= alpha:
            return "inconclusive"
        return "G > R: wins at equal realised compute" if row["G"] > row["R"] else "G < R: loses"

    out["verdict"] = out.apply(verdict, axis=1)
    return out.sort_values(["arm", "N"], ignore_index=True)


def token_multiple_figure(table: pd.DataFrame):
    """G (with its interval) and R against N, one panel per arm."""
    import matplotlib.pyplot as plt

    arms = list(dict.fromkeys(table["arm"]))
    fig, axes = plt.subplots(1, len(arms), figsize=(4.2 * len(arms), 3.6), squeeze=False)
    for ax, arm in zip(axes[0], arms, strict=True):
        t = table[table["arm"] == arm].sort_values("N")
        err = [t["G"] - t["G_low"], t["G_high"] - t["G"]]
        ax.errorbar(t["N"], t["G"], yerr=err, marker="o", capsize=3, label="G (90 % interval)")
        ax.plot(t["N"], t["R"], marker="s", linestyle="--", label="R (realised FLOPs/token ratio)")
        ax.set_xscale("log")
        ax.set_xlabel("non-embedding parameters N")
        ax.set_title(arm, fontsize=10)
        ax.axhline(1.0, color="grey", linewidth=0.5)
    axes[0][0].set_ylabel("vanilla tokens / D  (G),  compute ratio (R)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return fig
