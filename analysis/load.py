"""MLflow runs of a study into tidy pandas frames. Analysis reads only MLflow.

* :func:`load_runs`: one row per training run (not the sweep's parent runs): identity, method,
  size, parameter count, halting settings, status, and each metric's latest value.
* :func:`load_histories`: long-form metric histories (``run_id, key, step, value``),
  deduplicated by step: a resumed run may have logged a step twice (the later value wins).

* :class:`Study`: both of those for the finished runs of an experiment (or one sweep), the
  validation curves joined with training FLOPs, and the per-token depth samples that adaptive
  runs leave as artifacts: everything the report and the notebook need, loaded once.

All raise :class:`AnalysisError`, with a message that says what is missing, when an
experiment does not exist, has no runs, or lacks a requested metric.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd


class AnalysisError(ValueError):
    """The runs cannot answer the question asked (no runs, missing metrics, too few points)."""


def mlflow_client(uri: str | None):
    """A client of the tracking store ``uri`` (default: the one alcot's runs use)."""
    from mlflow.tracking import MlflowClient

    if uri is None:
        from alcot.orchestrator.config import alcot_home
        from alcot.orchestrator.tracking.stores import resolve_uri

        uri, _ = resolve_uri(None, alcot_home())
    return MlflowClient(tracking_uri=uri)


def training_runs(client, experiment: str, sweep_id: str | None):
    """The experiment's training runs (those with a config hash), of one sweep if
    ``sweep_id``; AnalysisError when there are none."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise AnalysisError(f"experiment {experiment!r} does not exist in {client.tracking_uri}")
    filters = ["tags.config_hash != ''"]
    if sweep_id:
        filters.append(f"tags.`alcot.sweep_id` = '{sweep_id}'")
    runs = client.search_runs(
        [exp.experiment_id], filter_string=" and ".join(filters), max_results=50000
    )
    if not runs:
        scope = f" for sweep {sweep_id}" if sweep_id else ""
        raise AnalysisError(f"experiment {experiment!r} has no training runs{scope}")
    return runs


def _number(text: str | None):
    if text is None or text == "None":
        return None
    try:
        return float(text)
    except ValueError:
        return text


def load_runs(experiment: str, sweep_id: str | None = None, uri: str | None = None) -> pd.DataFrame:
    client = mlflow_client(uri)
    rows = []
    for r in training_runs(client, experiment, sweep_id):
        p, t = r.data.params, r.data.tags
        row = {
            "run_id": r.info.run_id,
            "run_name": r.info.run_name,
            "status": r.info.status,
            "trial": t.get("config_hash", "")[:10],
            "sweep_id": t.get("alcot.sweep_id"),
            "method": t.get("method", p.get("model.method")),
            "size": t.get("size", p.get("model.size")),
            "params": _number(p.get("params.non_embedding")),
            "l_max": _number(p.get("model.l_max")),
            "lambda": _number(p.get("model.halting.lambda")),
            "beta": _number(p.get("model.halting.beta")),
            "tau": _number(p.get("model.halting.tau")),
            "seed": _number(p.get("seed")),
            "layers": _number(p.get("model.num_layers")),
            "lr": _number(p.get("train.lr")),
            # what a reader needs to judge a comparison: optimizer steps, warm-up, the
            # validation set's size
            "steps": _number(p.get("train.steps")),
            "warmup_frac": _number(p.get("train.warmup_frac")),
            "warmup_steps": _number(p.get("train.warmup_steps")),
            "batch_size": _number(p.get("train.batch_size")),
            "seq_len": _number(p.get("data.seq_len")),
            "eval_batches": _number(p.get("train.eval_batches")),
        }
        row.update({f"final/{k}": v for k, v in r.data.metrics.items()})
        rows.append(row)
    return pd.DataFrame(rows).sort_values(
        ["method", "size", "lambda"], na_position="first", ignore_index=True
    )


def _histories(client, run_ids, keys: list[str]) -> pd.DataFrame:
    """Long-form histories (run_id, key, step, value) of ``keys``; a step logged twice keeps
    its later value."""
    rows = [
        (run_id, key, m.step, m.timestamp, m.value)
        for run_id in run_ids
        for key in keys
        for m in client.get_metric_history(run_id, key)
    ]
    df = pd.DataFrame(rows, columns=["run_id", "key", "step", "timestamp", "value"])
    df = df.sort_values(["run_id", "key", "step", "timestamp"])
    df = df.drop_duplicates(["run_id", "key", "step"], keep="last")
    return df.drop(columns="timestamp").reset_index(drop=True)


def load_histories(
    experiment: str, keys: list[str], sweep_id: str | None = None, uri: str | None = None
) -> pd.DataFrame:
    client = mlflow_client(uri)
    ids = [r.info.run_id for r in training_runs(client, experiment, sweep_id)]
    df = _histories(client, ids, keys)
    missing = [k for k in keys if not (df["key"] == k).any()]
    if missing:
        raise AnalysisError(f"no run of experiment {experiment!r} logged {', '.join(missing)}")
    return df


CURVE_KEYS = ["val/loss", "flops/realised", "flops/nominal", "flops/paper", "tokens_seen"]


def _curves(hist: pd.DataFrame) -> pd.DataFrame:
    """Long histories -> one row per evaluation: run_id, step, val_loss, val_ppl, flops_realised,
    flops_nominal, flops_paper, tokens (the counters logged at the same step as the
    evaluation). Runs older than the paper counter simply lack it."""
    wide = hist.pivot_table(index=["run_id", "step"], columns="key", values="value")
    wide = wide.reset_index().rename(
        columns={
            "val/loss": "val_loss",
            "flops/realised": "flops_realised",
            "flops/nominal": "flops_nominal",
            "flops/paper": "flops_paper",
            "tokens_seen": "tokens",
        }
    )
    wide.columns.name = None
    wide = wide.dropna(subset=["val_loss"])
    wide["val_ppl"] = np.exp(wide["val_loss"].clip(upper=50.0))
    return wide.sort_values(["run_id", "step"], ignore_index=True)


@dataclass
class Study:
    """The finished training runs of one experiment (optionally one sweep), ready to analyse."""

    experiment: str
    sweep_id: str | None
    uri: str
    runs: pd.DataFrame  # finished runs, one row each (see load_runs)
    all_runs: pd.DataFrame  # including failed and running ones
    curves: pd.DataFrame  # one row per evaluation of a finished run (see _curves)
    notes: list[str] = field(default_factory=list)
    _token_depth: dict = field(default_factory=dict)  # methods -> samples (token_depth)

    @classmethod
    def load(cls, experiment: str, sweep_id: str | None = None, uri: str | None = None) -> Study:
        client = mlflow_client(uri)
        uri = client.tracking_uri
        all_runs = load_runs(experiment, sweep_id, uri)
        runs = all_runs[all_runs["status"] == "FINISHED"].reset_index(drop=True)
        notes = []
        skipped = len(all_runs) - len(runs)
        if skipped:
            states = ", ".join(sorted(set(all_runs["status"]) - {"FINISHED"}))
            notes.append(f"{skipped} run(s) not finished ({states}) are left out")
        if runs.empty:
            raise AnalysisError(f"experiment {experiment!r} has no finished training runs")
        needed = ["final/val/loss", "final/flops/realised"]
        missing = [k[6:] for k in needed if k not in runs or runs[k].isna().all()]
        if missing:
            raise AnalysisError(
                f"the runs of experiment {experiment!r} never logged {', '.join(missing)}: "
                "analysis needs evaluations (train.eval_every) and FLOPs counters"
            )
        curves = _curves(_histories(client, runs["run_id"], CURVE_KEYS))
        return cls(experiment, sweep_id, uri, runs, all_runs, curves, notes)

    def token_depth(self, methods: tuple[str, ...] = ("adaptive",)) -> pd.DataFrame:
        """Per-token samples (run_id, step0_loss, depth) from the artifacts
        ``diagnostics/token_depth.csv`` of the runs of ``methods`` (adaptive's by default;
        Mixture-of-Recursions writes them too); runs without the artifact are noted and
        skipped."""
        if methods in self._token_depth:
            return self._token_depth[methods]
        import os
        import tempfile

        from mlflow.artifacts import download_artifacts

        frames = []
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        with tempfile.TemporaryDirectory() as tmp:
            for i, run_id in enumerate(self.runs.loc[self.runs["method"].isin(methods), "run_id"]):
                try:
                    path = download_artifacts(
                        run_id=run_id,
                        artifact_path="diagnostics/token_depth.csv",
                        dst_path=f"{tmp}/{i}",
                        tracking_uri=self.uri,
                    )
                except Exception:
                    self.notes.append(f"run {run_id[:8]} has no diagnostics/token_depth.csv")
                    continue
                frame = pd.read_csv(path)
                frame.insert(0, "run_id", run_id)
                frames.append(frame)
        cols = ["run_id", "step0_loss", "depth"]
        self._token_depth[methods] = (
            pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)
        )
        return self._token_depth[methods]
