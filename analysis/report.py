"""The study report: every plot (PNG + SVG), the tables and the fitted laws with their
intervals, as one Markdown file and one self-contained HTML file (images inlined), optionally
logged as artifacts on the sweep's parent MLflow run so they show in the MLflow UI.

``alcot analyze`` is a thin wrapper over :func:`build_report` and :func:`log_report`; the
notebook calls the same functions piece by piece.
"""

from __future__ import annotations

import base64
import html
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from alcot.common.files import atomic_write

from . import curves as cv
from . import depth as dp
from . import plots
from .load import AnalysisError, Study
from .scaling import ScalingResult, fit_study, params_table, ratio_table


@dataclass
class Report:
    out_dir: Path
    markdown: Path
    html: Path
    figures: list[Path] = field(default_factory=list)
    scaling: ScalingResult | None = None
    logged_to: str | None = None  # MLflow run the files were logged to


def fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float | np.floating):
        if math.isinf(v):
            return "∞"
        return f"{v:.4g}"
    return str(v)


class Doc:
    """Blocks rendered to both Markdown and HTML."""

    def __init__(self):
        self.blocks: list[tuple] = []

    def h(self, level: int, text: str):
        self.blocks.append(("h", level, text))

    def p(self, text: str):
        self.blocks.append(("p", text))

    def items(self, lines: list[str]):
        if lines:
            self.blocks.append(("ul", lines))

    def table(self, df: pd.DataFrame, index: bool = False):
        self.blocks.append(("table", df.reset_index() if index else df))

    def figure(self, png: Path, caption: str):
        self.blocks.append(("fig", png, caption))

    def markdown(self) -> str:
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append("#" * b[1] + " " + b[2])
            elif b[0] == "p":
                out.append(b[1])
            elif b[0] == "ul":
                out.append("\n".join(f"* {line}" for line in b[1]))
            elif b[0] == "table":
                df = b[1]
                cols = [str(c) for c in df.columns]
                rows = [[fmt(v) for v in r] for r in df.itertuples(index=False)]
                lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                lines += ["| " + " | ".join(r) + " |" for r in rows]
                out.append("\n".join(lines))
            elif b[0] == "fig":
                out.append(f"![{b[2]}]({b[1].name})\n\n*{b[2]}* ([SVG]({b[1].stem}.svg))")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        body = []
        for b in self.blocks:
            if b[0] == "h":
                body.append(f"<h{b[1]}>{html.escape(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                body.append(f"<p>{html.escape(b[1])}</p>")
            elif b[0] == "ul":
                body.append("<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in b[1]) + "</ul>")
            elif b[0] == "table":
                df = b[1].copy()
                for c in df.columns:
                    df[c] = [fmt(v) for v in df[c]]
                body.append(df.to_html(index=False, border=0, classes="t"))
            elif b[0] == "fig":
                data = base64.b64encode(b[1].read_bytes()).decode()
                body.append(
                    f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(b[2])}">'
                    f"<figcaption>{html.escape(b[2])}</figcaption></figure>"
                )
        style = (
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
            "table.t{border-collapse:collapse;font-size:13px;margin:1em 0}"
            "table.t td,table.t th{border-bottom:1px solid #ddd;padding:3px 8px;text-align:right}"
            "img{max-width:100%}figcaption{font-size:13px;color:#555}"
        )
        return (
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n"
        )


def _write(path: Path, text: str) -> Path:
    return atomic_write(path, text)


def glance(points: pd.DataFrame) -> pd.DataFrame:
    """Per size: vanilla's final perplexity against each other method's best run of that size,
    with the compute it spent relative to vanilla (claim 1: equal parameters and tokens)."""
    rows = []
    for size, g in points.groupby("size", sort=False):
        van = g[g["method"] == "vanilla"]
        for method, m in g.groupby("method"):
            best = m.loc[m["val_ppl"].idxmin()]
            row = {
                "size": size,
                "method": method,
                "best run": best["label"],
                "val ppl": best["val_ppl"],
                "compute": best["flops"],
            }
            if not van.empty:
                v = van.iloc[0]
                row["ppl vs vanilla"] = best["val_ppl"] / v["val_ppl"]
                row["compute vs vanilla"] = best["flops"] / v["flops"]
            rows.append(row)
    return pd.DataFrame(rows)


def refused(res: ScalingResult, law: str) -> list[str]:
    return [f"not fitted: {why}" for (kind, _), why in res.refused.items() if kind == law]


def build_report(
    study: Study,
    out_dir: Path,
    flops: str = "realised",
    points: str = "envelope",
    n_boot: int = 200,
    level: float = 0.9,
    target_ppl: float | None = None,
    seed: int = 0,
    log=print,
) -> Report:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cv.flops_column(flops)
    doc = Doc()
    figures: list[Path] = []
    scope = f"sweep {study.sweep_id}" if study.sweep_id else "all sweeps"
    doc.h(1, f"alcot study report: {study.experiment}")
    doc.p(
        f"Experiment {study.experiment!r} ({scope}), {len(study.runs)} finished training runs, "
        f"compute measured as {flops} FLOPs. Generated "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from the MLflow store {study.uri}."
    )

    def fig(f, name: str, caption: str):
        paths = plots.save(f, out_dir, name)
        figures.extend(paths)
        doc.figure(paths[0], caption)

    # -- runs
    pts = cv.final_points(study, flops)
    doc.h(2, "Runs")
    show = pts[["label", "params", "tokens", "flops", "val_ppl", "mean_depth", "trial"]].copy()
    doc.table(show.rename(columns={"flops": f"{flops} FLOPs", "params": "non-emb params"}))
    doc.h(3, "At a glance: each method's best run per size against vanilla")
    doc.table(glance(pts))

    # -- curves at matched compute
    log("analysis: curves at matched compute")
    curves = cv.run_curves(study, flops)
    env = cv.envelope(curves, "method")
    doc.h(2, "Perplexity against compute")
    fig(
        plots.curves_figure(curves, flops, env),
        "curves",
        f"Validation perplexity against {flops} training FLOPs, every evaluation of every run.",
    )
    try:
        levels = cv.matched_levels(curves, 5, by="method")
        doc.p(
            f"Validation perplexity at matched compute (columns: {flops} FLOPs), interpolated "
            "in log compute between evaluations, never extrapolated. Per run configuration "
            "(– where the run did not reach that compute, or had not been evaluated yet):"
        )
        doc.table(cv.at_matched_flops(curves, levels, "label"), index=True)
        doc.p(
            "Per method, the best perplexity any of its runs reached within each compute "
            "budget (a run that finished below the budget counts with its final value):"
        )
        doc.table(cv.at_matched_flops(curves, levels, "method", carry=True), index=True)
    except AnalysisError as err:
        doc.p(f"No matched-compute comparison: {err}.")

    # -- pareto
    fronts = {m: cv.pareto_front(g) for m, g in pts.groupby("method")}
    doc.h(2, "Pareto front across the halting penalty")
    fig(
        plots.pareto_figure(pts, fronts, flops),
        "pareto",
        "Final validation perplexity against each run's total compute; lines join each "
        "method's non-dominated runs.",
    )
    overall = cv.pareto_front(pts)
    doc.p("Runs on the overall front (no run has both less compute and lower perplexity):")
    front = overall[["label", "flops", "val_ppl", "mean_depth"]]
    doc.table(front.rename(columns={"flops": f"{flops} FLOPs"}))

    # -- fits
    log(f"analysis: scaling-law fits ({n_boot} bootstrap replicates)")
    res = fit_study(study, flops, points, n_boot, level, seed, target_ppl)
    doc.h(2, "Scaling-law fits")
    doc.p(
        f"L(C) = E + A·C^-α fitted per method to its {points} points (Huber loss on log loss, "
        f"multi-start L-BFGS); intervals: {level:.0%} bootstrap over runs ({n_boot} replicates). "
        "C in FLOPs, L in nats per token."
    )
    if res.power:
        doc.table(params_table(res.power, ["E", "A", "alpha"]))
        fig(
            plots.fits_figure(res.data, res.power, flops, level),
            "fits",
            f"Fitted L(C) per method with {level:.0%} bootstrap bands.",
        )
    doc.items(refused(res, "power_law"))
    doc.h(3, "Compute to reach a target perplexity, relative to vanilla")
    if res.ratios:
        doc.p(
            f"Target: validation perplexity {math.exp(res.target_loss):.4g} (loss "
            f"{res.target_loss:.4f}). A ratio below 1 means the method needs less compute than "
            "vanilla to get there."
        )
        doc.table(ratio_table(res))
    else:
        doc.p(res.ratio_note or "No method besides the reference was fitted.")
    doc.h(3, "Chinchilla approach 3: L(N, D) = E + A/N^a + B/D^b")
    if res.chinchilla:
        doc.table(params_table(res.chinchilla, ["E", "A", "a", "B", "b"]))
    doc.items(refused(res, "chinchilla"))

    # -- depth
    log("analysis: depth diagnostics")
    doc.h(2, "Depth diagnostics")
    fr = dp.depth_fractions(study)
    if fr.empty:
        doc.p("No run with latent steps: nothing to show.")
    else:
        fig(
            plots.depth_hist_figure(fr),
            "depth_histograms",
            "Share of validation tokens at each executed depth, per run.",
        )
    pen = dp.depth_vs_penalty(study)
    if not pen.empty and pen["mean_depth"].notna().any():
        if pen["lambda"].nunique() > 1 or pen["beta"].nunique() > 1:
            fig(
                plots.depth_penalty_figure(pen),
                "depth_vs_penalty",
                "Mean executed depth of adaptive runs against the halting penalties.",
            )
        doc.table(pen)
    corr = dp.difficulty_correlation(study)
    if corr.empty:
        doc.p("No per-token depth samples (adaptive runs log diagnostics/token_depth.csv).")
    else:
        names = dict(zip(corr["run_id"], corr["run"], strict=True))
        fig(
            plots.difficulty_figure(dp.difficulty_bins(study), names),
            "depth_vs_difficulty",
            "Mean executed depth per decile of token difficulty (cross-entropy of the step-0 "
            "prediction).",
        )
        doc.p("Rank correlation between token difficulty and executed depth (Spearman):")
        doc.table(corr.drop(columns="run_id"))
    _evaluation_section(study, doc, fig)
    if study.notes:
        doc.h(2, "Notes")
        doc.items(study.notes)

    md = _write(out_dir / "report.md", doc.markdown())
    page = _write(out_dir / "report.html", doc.html(f"alcot: {study.experiment}"))
    return Report(out_dir, md, page, figures, res)


def _evaluation_section(study: Study, doc, fig) -> None:
    """Downstream accuracy against training FLOPs, and the test-time compute curve, from the
    eval/ metrics of ``alcot eval`` (or a sweep's eval: section); nothing without them."""
    from . import evals

    points = evals.eval_points(study.runs)
    if points.empty:
        return
    doc.h(2, "Evaluation")
    acc = evals.accuracy_table(points)
    if not acc.empty:
        doc.p("Task accuracy (lm-eval) at each run's trained halting budget:")
        doc.table(acc)
        fig(
            evals.accuracy_vs_flops_figure(points),
            "accuracy_vs_flops",
            "Downstream accuracy against realised training FLOPs, per method.",
        )
    curve = evals.test_time_curve(points)
    if curve is not None:
        data, what, metric = curve
        fig(
            evals.test_time_figure(data, what, metric),
            "test_time_compute",
            f"Test-time compute: {what} {metric} against the inference FLOPs per token spent, "
            "one line per checkpoint, points labelled by tau / l_max.",
        )
        show = data[["label", "tau", "l_max", "flops_per_token", "value"]]
        doc.table(show.rename(columns={"value": f"{what} {metric}"}))


def parent_run(study: Study, client) -> str | None:
    """The newest sweep/search parent run of the study's sweep (the only sweep of its runs
    when none was named); None when the runs were not launched by a sweep."""
    sweep = study.sweep_id
    if sweep is None:
        ids = study.runs["sweep_id"].dropna().unique()
        if len(ids) != 1:
            return None
        sweep = ids[0]
    exp = client.get_experiment_by_name(study.experiment)
    found = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`alcot.sweep_id` = '{sweep}'",
        order_by=["attributes.start_time DESC"],
        max_results=5000,
    )
    parents = [r for r in found if r.data.tags.get("alcot.kind") in ("sweep", "search")]
    return parents[0].info.run_id if parents else None


def log_report(study: Study, report: Report, artifact_path: str = "analysis") -> str:
    """Log the report folder as artifacts of the sweep's parent run (or of a new
    ``alcot.kind=analysis`` run when the runs did not come from one sweep); returns its id."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=study.uri)
    run_id = parent_run(study, client)
    own_run = run_id is None
    if own_run:
        exp = client.get_experiment_by_name(study.experiment)
        run_id = client.create_run(
            exp.experiment_id,
            run_name=f"analysis-{time.strftime('%Y%m%d-%H%M%S')}",
            tags={"alcot.kind": "analysis"},
        ).info.run_id
    client.log_artifacts(run_id, str(report.out_dir), artifact_path)
    if own_run:
        client.set_terminated(run_id)
    report.logged_to = run_id
    return run_id


__all__ = ["Report", "build_report", "log_report"]
