"""A portable export of a study's MLflow runs, and its import into any MLflow store.

* :func:`export_runs`: an experiment's training runs as one gzipped JSON file: run info,
  params, tags, metric histories and the per-token depth samples. Histories keep every step at
  which the run was evaluated (``val/loss`` logged), its last step, and at most
  ``max_points`` evenly spaced steps of the per-step training metrics: everything the analysis
  reads, a few hundred kB for a study.
* :func:`import_runs`: those runs into an MLflow store (new run ids; the same names, start
  and end times, tags, params, metric values at the same steps, and artifacts).

Analysis reads only MLflow: a rebuild imports the export into a fresh sqlite store and loads
the study from there, exactly as from the live store.
"""

from __future__ import annotations

import gzip
import json
import math
import tempfile
from pathlib import Path

from .load import AnalysisError

EXPORT_FORMAT = "alcot-study-export"
EXPORT_VERSION = 1
DEPTH_ARTIFACT = "diagnostics/token_depth.csv"


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
