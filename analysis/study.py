"""The study's claims (R1-R5 of docs/study/README.md) from its MLflow runs, and a portable
export of those runs that rebuilds the same report anywhere.

* :func:`export_runs`: an experiment's training runs as one gzipped JSON file: run info,
  params, tags, metric histories and the per-token depth samples. Histories keep every step at
  which the run was evaluated (``val/loss`` logged), its last step, and at most
  ``max_points`` evenly spaced steps of the per-step training metrics: everything the analysis
  reads, a few hundred kB for a study.
* :func:`import_runs`: those runs into an MLflow store (new run ids; the same names, start
  and end times, tags, params, metric values at the same steps, and artifacts).
* :func:`claims`: the tables that answer R1-R5 (and the diagnostics that explain them), from
  a loaded :class:`~alcot.analysis.load.Study`.
* :func:`build`: the analysis report of ``alcot analyze`` plus the claims, as CSV tables,
  ``claims.md`` and figures, in one folder.

Analysis reads only MLflow: a rebuild imports the export into a fresh sqlite store and loads
the study from there, exactly as from the live store.
"""

from __future__ import annotations

import gzip
import json
import math
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from .load import AnalysisError, Study

EXPORT_FORMAT = "alcot-study-export"
EXPORT_VERSION = 1
DEPTH_ARTIFACT = "diagnostics/token_depth.csv"
DEEP = "vanilla-deep"  # vanilla with more layers than its ladder size: the larger vanilla
OTHERS = ["vanilla", DEEP, "looped", "pause", "ponder", "fixed", "mor"]
GRAD_KEYS = ["router_ratio", "router_cosine", "backbone_ratio", "backbone_cosine"]


# ------------------------------------------------------------------------------ export/import


def _thin(points: list[tuple[int, float]], keep: set[int], max_points: int) -> list:
    """One value per step (the last logged), at the steps in ``keep``, the last step, and at
    most ``max_points`` evenly spaced others."""
    by_step: dict[int, float] = {}
    for step, value in points:
        by_step[int(step)] = float(value)
    steps = sorted(by_step)
    if len(steps) > max_points:
        every = math.ceil(len(steps) / max_points)
        chosen = set(steps[::every]) | {steps[-1]} | (keep & set(steps))
        steps = sorted(chosen)
    return [[s, by_step[s]] for s in steps]


def export_runs(
    experiment: str, path: str | Path, uri: str | None = None, max_points: int = 100
) -> dict:
    """Write the experiment's training runs to ``path`` (gzipped JSON, byte-stable for the
    same runs). Returns a summary: runs, metric points, artifacts, bytes."""
    import os

    from mlflow.artifacts import download_artifacts

    from .load import mlflow_client, training_runs

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    client = mlflow_client(uri)
    runs = training_runs(client, experiment, None)
    out_runs = []
    points = 0
    artifacts = 0
    with tempfile.TemporaryDirectory() as tmp:
        for i, r in enumerate(sorted(runs, key=lambda r: (r.info.start_time, r.info.run_name))):
            hist = {
                key: [
                    (m.step, m.value)
                    for m in _ordered(client.get_metric_history(r.info.run_id, key))
                ]
                for key in sorted(r.data.metrics)
            }
            keep = {int(s) for s, _ in hist.get("val/loss", [])}
            metrics = {k: _thin(v, keep, max_points) for k, v in hist.items()}
            points += sum(len(v) for v in metrics.values())
            files = {}
            if r.data.tags.get("method") == "adaptive" or "val/mean_depth" in r.data.metrics:
                try:
                    local = download_artifacts(
                        run_id=r.info.run_id,
                        artifact_path=DEPTH_ARTIFACT,
                        dst_path=f"{tmp}/{i}",
                        tracking_uri=client.tracking_uri,
                    )
                    files[DEPTH_ARTIFACT] = Path(local).read_text()
                    artifacts += 1
                except Exception:
                    pass  # runs without latent steps have none
            out_runs.append(
                {
                    "run_name": r.info.run_name,
                    "status": r.info.status,
                    "start_time": r.info.start_time,
                    "end_time": r.info.end_time,
                    "params": dict(sorted(r.data.params.items())),
                    "tags": {
                        k: v
                        for k, v in sorted(r.data.tags.items())
                        if k != "mlflow.runName" and not k.startswith("mlflow.log-model")
                    },
                    "metrics": metrics,
                    "artifacts": files,
                }
            )
    doc = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "experiment": experiment,
        "runs": out_runs,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    with open(path, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as gz:
        gz.write(blob)
    return {
        "runs": len(out_runs),
        "points": points,
        "artifacts": artifacts,
        "bytes": path.stat().st_size,
    }


def _ordered(history):
    return sorted(history, key=lambda m: (m.step, m.timestamp))


def read_export(path: str | Path) -> dict:
    """The export's document; an :class:`AnalysisError` naming the file when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise AnalysisError(f"export {path} does not exist")
    try:
        with gzip.open(path, "rb") as f:
            doc = json.loads(f.read())
    except (OSError, ValueError) as err:
        raise AnalysisError(f"{path} is not a gzipped JSON study export ({err})") from None
    if not isinstance(doc, dict) or doc.get("format") != EXPORT_FORMAT:
        raise AnalysisError(f"{path} is not an alcot study export (no format {EXPORT_FORMAT!r})")
    if doc.get("version") != EXPORT_VERSION:
        raise AnalysisError(
            f"{path} is export version {doc.get('version')!r}; this alcot reads {EXPORT_VERSION}"
        )
    if not doc.get("runs"):
        raise AnalysisError(f"{path} holds no runs")
    return doc


def import_runs(path: str | Path, uri: str, artifact_root: str | Path | None = None) -> str:
    """Create the export's experiment and runs in the MLflow store ``uri`` (which must not
    have that experiment yet), artifacts under ``artifact_root`` (default: the store's own
    default). Returns the experiment name."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    doc = read_export(path)
    client = MlflowClient(tracking_uri=uri)
    name = doc["experiment"]
    if client.get_experiment_by_name(name) is not None:
        raise AnalysisError(f"experiment {name!r} already exists in {uri}")
    location = Path(artifact_root).resolve().as_uri() if artifact_root else None
    exp_id = client.create_experiment(name, artifact_location=location)
    with tempfile.TemporaryDirectory() as tmp:
        for i, r in enumerate(doc["runs"]):
            run = client.create_run(
                exp_id, start_time=r["start_time"], tags=r["tags"], run_name=r["run_name"]
            )
            rid = run.info.run_id
            params = [Param(k, v) for k, v in r["params"].items()]
            for j in range(0, len(params), 100):
                client.log_batch(rid, params=params[j : j + 100])
            t0 = int(r["start_time"] or 0)
            metrics = [
                Metric(key, float(value), t0 + int(step), int(step))
                for key, pts in r["metrics"].items()
                for step, value in pts
            ]
            for j in range(0, len(metrics), 1000):
                client.log_batch(rid, metrics=metrics[j : j + 1000])
            for art, text in r["artifacts"].items():
                folder = Path(tmp) / str(i) / Path(art).parent
                folder.mkdir(parents=True, exist_ok=True)
                local = folder / Path(art).name
                local.write_text(text)
                client.log_artifact(rid, str(local), str(Path(art).parent))
            client.set_terminated(rid, status=r["status"], end_time=r["end_time"])
    return name


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


def _sizes(values) -> list[str]:
    """The sizes present, smallest first (the ladder's order; unknown names after)."""
    from .plots import size_order

    return size_order(pd.Series(values).dropna().unique())


def _own_rates(runs: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
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
    lrs, at_lr = _own_rates(r)
    main = r[at_lr & r["score"].notna()]
    shown = sorted({f"{v:g}" for v in lrs.dropna()})
    lr_note = (
        shown[0]
        if len(shown) == 1
        else "per method: " + ", ".join(f"{m} {v:g}" for m, v in lrs.dropna().items())
    )
    sizes = _sizes(r["size"])
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

    def fmt_runs(g):
        return len(g)

    # R1: adaptive vs vanilla at equal parameters and tokens
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

    # R2: adaptive vs every other method at the size's budget (isoFLOP)
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

    # R3: halting penalty and beta against depth and cross-entropy
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

    # R4: depth against token difficulty, per adaptive run
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

    # R5: the fitted laws and compute ratios (from analysis.scaling)
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

    # diagnostics: the adaptive loss's share of the training loss, and learning rates
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
    return out


def write_claims(c: Claims, out_dir: Path) -> list[Path]:
    """Each table as ``tables/<name>.csv`` and all of them in ``claims.md``, with four
    significant digits (what the report shows), so a rebuild compares byte for byte: the
    bootstrap's refits on another machine or thread count differ past that (seen in the 5th
    digit of an interval's bound)."""
    from .report import Doc

    folder = Path(out_dir) / "tables"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.csv"):
        old.unlink()
    written = []
    doc = Doc()
    doc.h(1, "Claims R1-R5: tables")
    doc.items(c.notes)
    for name, df in c.tables.items():
        path = folder / f"{name}.csv"
        df.to_csv(path, index=False, float_format="%.4g", lineterminator="\n")
        written.append(path)
        doc.h(2, name)
        doc.table(df)
    md = Path(out_dir) / "claims.md"
    md.write_text(doc.markdown(), encoding="utf-8")
    written.append(md)
    return written


def curves_figure(study: Study, flops: str = "realised"):
    """Validation loss against training tokens and against compute, one panel per size,
    one line per run, coloured by method: the training curves behind the verdicts."""
    import matplotlib.pyplot as plt

    from .curves import run_curves
    from .plots import colour

    c = run_curves(study, flops)
    sizes = _sizes(c["size"])
    fig, axes = plt.subplots(2, len(sizes), figsize=(4.4 * len(sizes), 6.4), squeeze=False)
    for j, size in enumerate(sizes):
        sub = c[c["size"] == size]
        for _, g in sub.groupby("run_id"):
            method = g["method"].iloc[0]
            for i, x in enumerate(("tokens", "flops")):
                axes[i][j].plot(
                    g[x], g["val_loss"], "-", color=colour(method), lw=1, alpha=0.8, label=method
                )
        for i, x in enumerate(("tokens", f"{flops} FLOPs")):
            ax = axes[i][j]
            ax.set_xscale("log")
            ax.set_xlabel(f"training {x}")
            ax.set_ylabel("validation loss")
            ax.set_title(size, fontsize=10)
    uniq = {}
    for ax in axes[0]:
        for h, name in zip(*ax.get_legend_handles_labels(), strict=True):
            uniq.setdefault(name, h)
    fig.legend(list(uniq.values()), list(uniq.keys()), fontsize=8, loc="center right")
    fig.tight_layout(rect=(0, 0, 0.88, 1))
    return fig


def build(
    study: Study,
    out_dir: str | Path,
    flops: str = "realised",
    points: str = "envelope",
    n_boot: int = 200,
    level: float = 0.9,
    seed: int = 0,
    log=print,
):
    """The whole study report in ``out_dir``: ``report.md`` / ``report.html`` and plots
    (``alcot analyze``'s, with the larger vanilla as its own method and the target of the
    compute ratios set to vanilla's best validation perplexity), the claims tables and
    ``claims.md``, and the training-curves figure. Returns (Report, Claims)."""
    from . import plots
    from .report import build_report

    out_dir = Path(out_dir)
    mark_variants(study)
    main = at_method_rates(study)
    van = main.curves.merge(main.runs[["run_id", "method"]], on="run_id")
    van = van[van["method"] == "vanilla"]
    target = float(van["val_ppl"].min()) if not van.empty else None
    report = build_report(
        main,
        out_dir,
        flops=flops,
        points=points,
        n_boot=n_boot,
        level=level,
        target_ppl=target,
        seed=seed,
        log=log,
    )
    c = claims(study, report.scaling, level=level, seed=seed)
    write_claims(c, out_dir)
    report.figures.extend(plots.save(curves_figure(main, flops), out_dir, "training_curves"))
    return report, c


def at_method_rates(study: Study) -> Study:
    """The study without the learning-rate search's other points: each method's runs at its
    own rate (the one most of its runs use, as in :func:`claims`). The analysis report, its
    fits and the curves are drawn from these; the search shows in ``diag_learning_rate``."""
    import dataclasses

    r = study.runs
    _, keep = _own_rates(r)
    if keep.all():
        return study
    ids = set(r.loc[keep, "run_id"])
    dropped = int((~keep).sum())
    return dataclasses.replace(
        study,
        runs=r[keep].reset_index(drop=True),
        all_runs=study.all_runs[study.all_runs["run_id"].isin(ids)].reset_index(drop=True),
        curves=study.curves[study.curves["run_id"].isin(ids)].reset_index(drop=True),
        notes=[
            *study.notes,
            f"{dropped} run(s) of the learning-rate search at other rates than their method's "
            "are left out of this report (they are in the claims' diag_learning_rate table)",
        ],
        _token_depth=None,
    )


def rebuild(export: str | Path, out_dir: str | Path, log=print, **kwargs):
    """Import ``export`` into a fresh temporary sqlite MLflow store and :func:`build` the
    report from it. Returns (Report, Claims)."""
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        name = import_runs(export, uri, f"{tmp}/mlartifacts")
        study = Study.load(name, uri=uri)
        study.uri = uri
        return build(study, out_dir, log=log, **kwargs)
