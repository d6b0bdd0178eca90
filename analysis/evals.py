"""Evaluation results (``alcot eval``, a sweep's ``eval:`` section) in the study report.

Reads the ``eval/budget/tau_<tau>_lmax_<l_max>/<what>/<metric>`` metrics that evaluation logs
on each training run (the run's latest values; ``what`` is a corpus or an lm-eval task), so it
needs nothing but the runs already loaded:

* downstream accuracy against training FLOPs, one line per method (at the trained budget);
* the test-time compute curve: quality (a corpus's perplexity, or a task's accuracy) against
  the inference FLOPs per token each budget spent, one line per checkpoint, points labelled by
  tau / l_max.
"""

from __future__ import annotations

import re

import pandas as pd

PATTERN = re.compile(r"^final/eval/budget/tau_(?P<tau>[^_]+)_lmax_(?P<lmax>\d+)/(?P<rest>.+)$")


def eval_points(runs: pd.DataFrame) -> pd.DataFrame:
    """Long form: run_id, method, size, label, tau, l_max, what, metric, value, flops_per_token
    (of that budget over everything evaluated), trained (the budget the run trained with)."""
    rows = []
    for _, r in runs.iterrows():
        per_budget: dict[tuple[float, int], dict[str, float]] = {}
        for col, value in r.items():
            m = PATTERN.match(str(col))
            if m is None or pd.isna(value):
                continue
            key = (float(m["tau"]), int(m["lmax"]))
            per_budget.setdefault(key, {})[m["rest"]] = float(value)
        for (tau, l_max), metrics in per_budget.items():
            fpt = metrics.get("flops_per_token")
            for rest, value in metrics.items():
                if "/" not in rest or rest.startswith("tasks/"):
                    continue
                what, metric = rest.rsplit("/", 1)
                rows.append(
                    {
                        "run_id": r["run_id"],
                        "method": r["method"],
                        "size": r["size"],
                        "label": _label(r),
                        "tau": tau,
                        "l_max": l_max,
                        "what": what,
                        "metric": metric,
                        "value": value,
                        "flops_per_token": metrics.get(
                            f"{what}/flops_per_token", metrics.get("tasks/flops_per_token", fpt)
                        ),
                        "train_flops": r.get("final/flops/realised"),
                        "trained": (
                            (pd.isna(r.get("tau")) or abs(tau - float(r["tau"])) < 1e-12)
                            and (pd.isna(r.get("l_max")) or l_max == int(r["l_max"]))
                        ),
                    }
                )
    cols = ["run_id", "method", "size", "label", "tau", "l_max", "what", "metric", "value"]
    return pd.DataFrame(rows, columns=[*cols, "flops_per_token", "train_flops", "trained"])


def _label(r) -> str:
    lam = r.get("lambda")
    pen = f" λ={lam:g}" if r["method"] == "adaptive" and pd.notna(lam) else ""
    return f"{r['method']} {r['size']}{pen} ({str(r.get('trial') or r['run_id'])[:6]})"


def accuracy_table(points: pd.DataFrame) -> pd.DataFrame:
    """Task accuracies at the trained budget: one row per run, one column per task metric."""
    acc = points[points["trained"] & points["metric"].isin(["acc", "acc_norm"])]
    if acc.empty:
        return acc
    acc = acc.assign(col=acc["what"] + " " + acc["metric"])
    table = acc.pivot_table(index=["label", "train_flops"], columns="col", values="value")
    return table.reset_index().sort_values("train_flops")


def accuracy_vs_flops_figure(points: pd.DataFrame):
    import matplotlib.pyplot as plt

    from .plots import colour as method_colour

    acc = points[points["trained"] & (points["metric"] == "acc")]
    tasks = sorted(acc["what"].unique())
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        sub = acc[acc["what"] == task]
        for method, g in sub.groupby("method"):
            g = g.sort_values("train_flops")
            ax.plot(g["train_flops"], g["value"], "o-", color=method_colour(method), label=method)
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs (realised)")
        ax.set_ylabel("accuracy")
        ax.set_title(task, fontsize=10)
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    fig.tight_layout()
    return fig


def test_time_curve(points: pd.DataFrame) -> tuple[pd.DataFrame, str, str] | None:
    """The points of the test-time compute curve: the first corpus's perplexity, else the
    first task's accuracy; None when no run was evaluated at more than one budget."""
    for metric in ("ppl", "acc"):
        sub = points[points["metric"] == metric]
        if sub.empty:
            continue
        what = sorted(sub["what"].unique())[0]
        sub = sub[sub["what"] == what]
        budgets_per_run = sub.groupby("run_id")[["tau", "l_max"]].apply(
            lambda g: len(g.drop_duplicates())
        )
        if budgets_per_run.max() < 2:
            continue
        return sub.sort_values(["run_id", "flops_per_token"]), what, metric
    return None


def test_time_figure(curve: pd.DataFrame, what: str, metric: str):
    import matplotlib.pyplot as plt

    from .plots import colour as method_colour

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for _, g in curve.groupby("run_id"):
        ax.plot(
            g["flops_per_token"],
            g["value"],
            "o-",
            color=method_colour(g["method"].iloc[0]),
            label=g["label"].iloc[0],
        )
        # label every point of a short line, only its cheapest and dearest of a long one
        shown = g if len(g) <= 6 else g.iloc[[0, -1]]
        for _, p in shown.iterrows():
            ax.annotate(
                f"τ={p['tau']:g}, L={p['l_max']}",
                (p["flops_per_token"], p["value"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.set_xscale("log")
    if metric == "ppl":
        ax.set_yscale("log")
    ax.set_xlabel("inference FLOPs per token (realised)")
    ax.set_ylabel(f"{what} {metric}")
    ax.set_title("test-time compute: one line per checkpoint", fontsize=10)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    fig.tight_layout()
    return fig
