"""MLflow runs of a study into tidy pandas frames. Analysis reads only MLflow.

* :func:`load_runs`: one row per training run (not the sweep's parent runs): identity, method,
  size, parameter count, halting settings, status, and each metric's latest value.
* :func:`load_histories`: long-form metric histories (``run_id, key, step, value``),
  deduplicated by step: a resumed run may have logged a step twice (the later value wins).

Both raise :class:`AnalysisError`, with a message that says what is missing, when an
experiment does not exist, has no runs, or lacks a requested metric.
"""

from __future__ import annotations

import pandas as pd


class AnalysisError(ValueError):
    """The runs cannot answer the question asked (no runs, missing metrics, too few points)."""


def _client(uri: str | None):
    from mlflow.tracking import MlflowClient

    if uri is None:
        from alcot.orchestrator.config import alcot_home
        from alcot.orchestrator.tracking import resolve_uri

        uri, _ = resolve_uri(None, alcot_home())
    return MlflowClient(tracking_uri=uri)


def _training_runs(client, experiment: str, sweep_id: str | None):
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
    client = _client(uri)
    rows = []
    for r in _training_runs(client, experiment, sweep_id):
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
        }
        row.update({f"final/{k}": v for k, v in r.data.metrics.items()})
        rows.append(row)
    return pd.DataFrame(rows).sort_values(
        ["method", "size", "lambda"], na_position="first", ignore_index=True
    )


def load_histories(
    experiment: str, keys: list[str], sweep_id: str | None = None, uri: str | None = None
) -> pd.DataFrame:
    client = _client(uri)
    frames = []
    for r in _training_runs(client, experiment, sweep_id):
        for key in keys:
            hist = client.get_metric_history(r.info.run_id, key)
            frames.append(
                pd.DataFrame(
                    [(r.info.run_id, key, m.step, m.timestamp, m.value) for m in hist],
                    columns=["run_id", "key", "step", "timestamp", "value"],
                )
            )
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    missing = [k for k in keys if df.empty or not (df["key"] == k).any()]
    if missing:
        raise AnalysisError(f"no run of experiment {experiment!r} logged {', '.join(missing)}")
    df = df.sort_values(["run_id", "key", "step", "timestamp"])
    df = df.drop_duplicates(["run_id", "key", "step"], keep="last")
    return df.drop(columns="timestamp").reset_index(drop=True)
