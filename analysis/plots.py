"""Figures for people: labelled axes with units, log scales where compute spans decades, one
colour per method in every figure, legends outside the data.

Every function returns a matplotlib Figure; :func:`save` writes it as PNG and SVG.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

if "ipykernel" not in sys.modules:  # no display: plots are files (notebooks keep inline)
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .fits import Fit  # noqa: E402

METHOD_COLOURS = {
    "vanilla": "#4d4d4d",
    "adaptive": "#d62728",
    "fixed": "#1f77b4",
    "looped": "#2ca02c",
    "pause": "#9467bd",
    "ponder": "#ff7f0e",
    "mor": "#8c564b",
}
_SPARE = ["#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]
SIZE_STYLES = ["-", "--", ":", "-."]
SIZE_MARKERS = ["o", "s", "^", "D", "v", "P"]
SIZE_ORDER = ["pico", "nano", "micro", "tiny", "mini", "70m", "160m", "410m", "1.4b"]


def colour(method: str) -> str:
    if method not in METHOD_COLOURS:
        METHOD_COLOURS[method] = _SPARE[(len(METHOD_COLOURS) - 7) % len(_SPARE)]
    return METHOD_COLOURS[method]


def size_order(values) -> list[str]:
    """The distinct sizes in ``values``, smallest first (the ladder's order; unknown after)."""
    known = [s for s in SIZE_ORDER if s in set(values)]
    return known + sorted(set(values) - set(known))


def _plain_log_y(ax):
    """Log y axis labelled 5, 6, 7 ... rather than 5x10^0 (perplexities span less than a
    decade in small studies)."""
    from matplotlib.ticker import FuncFormatter

    ax.set_yscale("log")
    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(fmt)
    ax.yaxis.set_minor_formatter(fmt)
    ax.tick_params(axis="y", which="minor", labelsize=7)


def flops_label(flops: str) -> str:
    return f"training compute ({flops} FLOPs)"


def _legend_outside(ax, handles=None, title=None):
    kw = {"handles": handles} if handles is not None else {}
    ax.legend(
        **kw, title=title, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False
    )


def _method_size_handles(methods, sizes, marker=False):
    from matplotlib.lines import Line2D

    hs = [Line2D([], [], color=colour(m), lw=2, label=m) for m in methods]
    for i, s in enumerate(sizes):
        kw = (
            {"marker": SIZE_MARKERS[i % 6], "ls": "none"}
            if marker
            else {"ls": SIZE_STYLES[i % 4], "marker": "o", "ms": 3}
        )
        hs.append(Line2D([], [], color="black", label=f"size {s}", **kw))
    return hs


def curves_figure(curves: pd.DataFrame, flops: str, env: pd.DataFrame | None = None):
    """Validation perplexity against compute, one line per run (colour: method, line: size),
    with each method's compute-efficient envelope drawn thick."""
    fig, ax = plt.subplots(figsize=(8, 4.8), layout="constrained")
    sizes = size_order(curves["size"])
    for _, g in curves.groupby("run_id"):
        g = g.sort_values("flops")
        first = g.iloc[0]
        ax.plot(
            g["flops"],
            g["val_ppl"],
            color=colour(first["method"]),
            ls=SIZE_STYLES[sizes.index(first["size"]) % 4],
            marker="o",
            ms=3,
            lw=1,
            alpha=0.75,
        )
    if env is not None:
        for method, g in env.groupby("method"):
            g = g.sort_values("flops")
            ax.plot(g["flops"], g["val_ppl"], color=colour(method), lw=3, alpha=0.35)
    ax.set_xscale("log")
    _plain_log_y(ax)
    ax.set_xlabel(flops_label(flops))
    ax.set_ylabel("validation perplexity")
    ax.set_title("Perplexity against training compute (thick: each method's envelope)")
    ax.grid(True, which="both", alpha=0.25)
    _legend_outside(ax, _method_size_handles(sorted(curves["method"].unique()), sizes))
    return fig


def pareto_figure(points: pd.DataFrame, fronts: dict[str, pd.DataFrame], flops: str):
    """Final perplexity against total compute of every run (marker: size), adaptive runs
    labelled with their lambda, each method's Pareto front as a step line."""
    fig, ax = plt.subplots(figsize=(8, 4.8), layout="constrained")
    sizes = size_order(points["size"])
    # adaptive runs in order of compute: alternate labels up-left / down-right, so that two
    # runs close together get their labels on opposite sides
    rank = points[points["method"] == "adaptive"]["flops"].rank(method="first")
    for i, p in points.iterrows():
        ax.scatter(
            p["flops"],
            p["val_ppl"],
            color=colour(p["method"]),
            marker=SIZE_MARKERS[sizes.index(p["size"]) % 6],
            s=36,
            zorder=3,
        )
        if p["method"] == "adaptive" and pd.notna(p["lambda"]):
            ax.annotate(
                f"λ={p['lambda']:g}",
                (p["flops"], p["val_ppl"]),
                textcoords="offset points",
                xytext=(-42, 10) if rank[i] % 2 else (8, -14),
                fontsize=7,
                arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "grey"},  # which point
            )
    for method, f in fronts.items():
        if len(f) > 1:
            ax.step(f["flops"], f["val_ppl"], where="post", color=colour(method), lw=1, alpha=0.6)
    ax.set_xscale("log")
    _plain_log_y(ax)
    ax.set_xlabel(flops_label(flops) + ", whole run")
    ax.set_ylabel("final validation perplexity")
    ax.set_title("Compute / quality trade-off (lines: each method's Pareto front)")
    ax.grid(True, which="both", alpha=0.25)
    handles = _method_size_handles(sorted(points["method"].unique()), sizes, marker=True)
    _legend_outside(ax, handles)
    return fig


def fits_figure(data: dict[str, pd.DataFrame], fits: dict[str, Fit], flops: str, level: float):
    """Fitted L(C) per method over the points it was fitted to, with the bootstrap band."""
    fig, ax = plt.subplots(figsize=(8, 4.8), layout="constrained")
    for method, pts in data.items():
        ax.scatter(pts["flops"], pts["val_loss"], color=colour(method), s=14, alpha=0.7)
        f = fits.get(method)
        if f is None:
            continue
        c = np.geomspace(pts["flops"].min() / 1.5, pts["flops"].max() * 1.5, 100)
        p = f.params
        ax.plot(
            c,
            f.predict(c),
            color=colour(method),
            lw=2,
            label=f"{method}: {p['E']:.2f} + {p['A']:.3g}·C^-{p['alpha']:.3f}",
        )
        if f.replicates:
            preds = np.array([f.predict(c, theta=r["_theta"]) for r in f.replicates])
            lo, hi = np.quantile(preds, [(1 - level) / 2, (1 + level) / 2], axis=0)
            ax.fill_between(c, lo, hi, color=colour(method), alpha=0.15, lw=0)
    ax.set_xscale("log")
    _plain_log_y(ax)
    ax.set_xlabel(flops_label(flops))
    ax.set_ylabel("validation loss (nats / token)")
    ax.set_title(f"L(C) = E + A·C^-α per method (bands: {level:.0%} bootstrap)")
    ax.grid(True, which="both", alpha=0.25)
    if ax.get_legend_handles_labels()[0]:
        _legend_outside(ax)
    return fig


def depth_hist_figure(fractions: pd.DataFrame):
    """Executed-depth histogram of each run with latent steps (small multiples)."""
    n = len(fractions)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(
        rows,
        cols,
        figsize=(2.6 * cols + 0.6, 2.3 * rows + 0.4),
        squeeze=False,
        sharey=True,
        layout="constrained",
    )
    for ax, (name, row) in zip(axes.flat, fractions.iterrows(), strict=False):
        method = str(name).split()[0]
        depths = [int(k) for k in row.index if pd.notna(row[k])]
        ax.bar(depths, [row[k] for k in depths], color=colour(method), width=0.8)
        ax.set_title(str(name), fontsize=8)
        ax.set_xticks(depths)
        ax.set_xlabel("executed latent steps")
    for ax in axes[:, 0]:
        ax.set_ylabel("share of val tokens")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("Executed depth per token (final evaluation)")
    return fig


def depth_penalty_figure(table: pd.DataFrame):
    """Mean executed depth against lambda (and against beta when beta was varied)."""
    betas = table["beta"].dropna().unique()
    panels = 2 if len(betas) > 1 else 1
    fig, axes = plt.subplots(
        1, panels, figsize=(5.2 * panels + 1.5, 4), squeeze=False, layout="constrained"
    )
    sizes = size_order(table["size"])
    ax = axes[0, 0]
    for (size, beta), g in table.groupby(["size", "beta"], dropna=False):
        g = g.sort_values("lambda")
        ls = SIZE_STYLES[sizes.index(size) % 4]
        lab = f"size {size}" + (f", β={beta:g}" if panels > 1 else "")
        ax.plot(
            g["lambda"], g["mean_depth"], ls=ls, marker="o", color=colour("adaptive"), label=lab
        )
    ax.set_xscale("log")
    ax.set_xlabel("halting penalty λ (log scale)")
    ax.set_ylabel("mean executed latent steps per token")
    ax.grid(True, which="both", alpha=0.25)
    if panels > 1:
        bx = axes[0, 1]
        for (size, lam), g in table.groupby(["size", "lambda"], dropna=False):
            g = g.sort_values("beta")
            bx.plot(
                g["beta"],
                g["mean_depth"],
                ls=SIZE_STYLES[sizes.index(size) % 4],
                marker="s",
                label=f"size {size}, λ={lam:g}",
            )
        bx.set_xlabel("halting sharpness β")
        bx.set_ylabel("mean executed latent steps per token")
        bx.grid(True, alpha=0.25)
        _legend_outside(bx)
    _legend_outside(ax)
    fig.suptitle("How the halting penalties move depth (adaptive runs)")
    return fig


def difficulty_figure(bins: pd.DataFrame, names: dict[str, str]):
    """Mean executed depth per difficulty decile (step-0 loss), one line per adaptive run."""
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    styles = ["-", "--", ":", "-."]
    for i, (run_id, g) in enumerate(bins.groupby("run_id", sort=False)):
        ax.plot(
            g["step0_loss"],
            g["depth"],
            marker="o",
            ms=3,
            ls=styles[i % 4],
            color=plt.cm.Reds(0.45 + 0.5 * i / max(1, bins["run_id"].nunique() - 1)),
            label=names.get(run_id, run_id[:8]),
        )
    ax.set_xlabel("token difficulty: step-0 cross-entropy (nats), decile means")
    ax.set_ylabel("mean executed latent steps")
    ax.set_title("Do hard tokens think longer?")
    ax.grid(True, alpha=0.25)
    _legend_outside(ax)
    return fig


def save(fig, out_dir: Path, name: str) -> list[Path]:
    """Write ``name.png`` and ``name.svg``; returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.svg"]
    fig.savefig(paths[0], dpi=130)
    fig.savefig(paths[1])
    plt.close(fig)
    return paths
