"""What the MLflow UI shows of alcot's runs: the metadata a user reads, not the numbers.

Kept apart from ``tracker.py`` (which moves metrics reliably) so the two change separately.

* Experiments carry ``mlflow.experimentKind = custom_model_development``: MLflow 3 opens an
  experiment in its GenAI (traces) view unless this tag says it holds model-training runs.
* Training runs get a readable name from their key settings (``adaptive-tiny-lam0.01-L3-1a2b3c``)
  and a short description (``mlflow.note.content``) with the settings and, at the end, the final
  metrics, so a run page answers "what is this and how did it do" at a glance.
* MLflow's standard source tags (``mlflow.source.name`` / ``type`` / ``git.commit`` / ``git.branch``
  / ``git.repoURL``, ``mlflow.user``) fill the runs table's Source and User columns.
* The training corpus is logged with ``log_inputs`` as a dataset named after the corpus, with the
  token cache's key (a hash of the documents and tokenizer settings) as its digest: the Dataset
  column then says which data a run saw, and runs on the same data share a digest.
* A finished run's final weights are logged as an MLflow model
  (:mod:`alcot.orchestrator.export.mlflow_model`).
* Each experiment also holds a saved UI view (:func:`view_state`, :func:`ui_path`): runs sorted
  by validation perplexity with the key settings and final metrics as columns, and the scaling
  study's charts (:func:`view_charts`).
"""

from __future__ import annotations

import contextlib
import getpass
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
MODEL_NAME = "model"  # the logged model's name on a training run
MODEL_URI_TAG = "alcot.model_uri"  # the run tag holding its model's ``models:/<id>`` URI

# The settings and final metrics a user compares runs by (also the run description's rows).
KEY_PARAMS = ("model.method", "model.size", "model.halting.lambda", "model.l_max")
KEY_METRICS = ("val/ppl", "val/mean_depth", "flops/realised")


# ------------------------------------------------------------------------------ experiments
def experiment_tags() -> dict[str, str]:
    return {
        EXPERIMENT_KIND_TAG: EXPERIMENT_KIND,
        VIEW_TAG_PREFIX + VIEW_KEY: json.dumps(view_state(), sort_keys=True),
    }


def mark_experiment(client, experiment_id: str, tags: dict[str, str] | None = None) -> None:
    """Set the tags of :func:`experiment_tags` that an existing experiment lacks (stores made
    before alcot set them)."""
    current = tags if tags is not None else client.get_experiment(experiment_id).tags
    for key, value in experiment_tags().items():
        if current.get(key) != value:
            client.set_experiment_tag(experiment_id, key, value)


# The MLflow UI's "share view" state, stored as an experiment tag and opened with
# ``#/experiments/<id>?viewStateShareKey=<key>``: runs ordered by validation perplexity (a sort
# other than by date also lists the trials flat instead of collapsed under their sweep's parent
# run), with the key settings and final metrics as columns beside Dataset, Source and Models.
VIEW_KEY = "alcot-runs"
VIEW_TAG_PREFIX = "mlflow.sharedViewState."


def view_state() -> dict[str, Any]:
    columns = [
        "attributes.`Dataset`",
        "attributes.`Source`",
        "attributes.`Models`",
        *(f"params.`{k}`" for k in KEY_PARAMS),
        *(f"metrics.`{k}`" for k in KEY_METRICS),
    ]
    return {
        "searchFilter": "",
        "orderByKey": f"metrics.`{KEY_METRICS[0]}`",
        "orderByAsc": True,
        "selectedColumns": columns,
        **view_charts(),
    }


# The charts a scaling study is read by, in the same saved view (its Chart tab, opened directly
# by ``ui_path(..., charts=True)``). MLflow 3.17 keeps the runs-compare charts of a shared view
# in ``compareRunCharts`` (one card per chart, the fields of the UI's RunsChartsCardConfig
# classes) and ``compareRunSections``; the cards below are what its chart editor saves for these
# settings. MLflow adds a card per other logged metric after them, in sections of their own
# (below ours: ``isAccordionReordered`` keeps the given order).
#
# Log-scale FLOPs: MLflow 3.17 draws a line chart's x-axis on a log scale only when the x-axis
# is the step (``xAxisScaleType`` is ignored for a metric x-axis), and its scatter charts have no
# log axes at all. So each evaluation also logs ``flops/realised_log10`` (:func:`scaling_metrics`)
# and the two FLOPs charts use it as their x-axis: a linear axis over log10 FLOPs.
CHART_SECTION = "alcot-scaling"
FLOPS_METRIC = "flops/realised"
FLOPS_LOG_METRIC = "flops/realised_log10"
PPL_METRIC = "val/ppl"
PARALLEL_PARAMS = ("model.size", "model.method", "model.halting.lambda")


def scaling_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """A row of training metrics as tracked: with a validation perplexity it also gets
    ``flops/realised_log10`` (the x-axis of the saved view's FLOPs charts); ``metrics`` itself
    is left as it is. The training run's tracking callback (``TrackMetrics`` in
    ``orchestrator/training_run.py``) applies it to every row; it lives here, a plain function,
    so that this module stays free of the trainer (and of torch, which the CLI need not load)."""
    flops = metrics.get(FLOPS_METRIC)
    if PPL_METRIC in metrics and flops is not None and flops > 0:
        return {**metrics, FLOPS_LOG_METRIC: math.log10(flops)}
    return metrics


def _card(uuid: str, kind: str, **fields) -> dict[str, Any]:
    return {
        "uuid": uuid,
        "type": kind,
        "metricSectionId": CHART_SECTION,
        "runsCountToCompare": 100,
        "deleted": False,
        "isGenerated": False,
        **fields,
    }


def view_charts() -> dict[str, Any]:
    """The saved view's charts: validation perplexity against realised training FLOPs (log10
    FLOPs as x-axis; every trial a line through its evaluations), final perplexity against
    final FLOPs (a scatter of the trials: the Pareto view) and size / method / lambda against
    perplexity (parallel coordinates). All trials are shown (not MLflow's first ten)."""
    line = _card(
        "alcot-ppl-vs-flops",
        "LINE",
        metricKey=PPL_METRIC,
        selectedMetricKeys=[PPL_METRIC],
        xAxisKey="metric",
        selectedXAxisMetricKey=FLOPS_LOG_METRIC,
        useGlobalXaxisKey=False,
        xAxisScaleType="linear",  # the metric is log10 FLOPs already
        scaleType="linear",
        lineSmoothness=0,
        useGlobalLineSmoothing=False,
        yAxisKey="metric",
        yAxisExpressions=[],
        ignoreOutliers=False,
        range={},
    )
    scatter = _card(
        "alcot-pareto",
        "SCATTER",
        xaxis={"key": FLOPS_LOG_METRIC, "type": "METRIC"},
        yaxis={"key": PPL_METRIC, "type": "METRIC"},
    )
    parallel = _card(
        "alcot-parallel",
        "PARALLEL",
        selectedParams=list(PARALLEL_PARAMS),
        selectedMetrics=[PPL_METRIC],
        showAllRuns=False,
    )
    section = {
        "uuid": CHART_SECTION,
        "name": "Scaling study",
        "display": True,
        "isReordered": True,
        "deleted": False,
        "isGenerated": False,
    }
    return {
        "compareRunCharts": [line, scatter, parallel],
        "compareRunSections": [section],
        "isAccordionReordered": True,
        "runsHiddenMode": "SHOW_ALL",
        "hideEmptyCharts": True,
    }


# MLflow 3.17's UI has a global GenAI / Model-training switch (default GenAI, remembered by the
# browser) that, when present, decides over the experiment kind tag: with GenAI an experiment
# opens on its traces overview. Links alcot prints select model training explicitly.
WORKFLOW = "workflowType=machine_learning"
UI_HOME = f"/#/experiments?{WORKFLOW}"


def ui_path(experiment_id: str, charts: bool = False) -> str:
    """The UI route (after the server's address) that opens ``experiment_id`` in alcot's view:
    its runs table, or with ``charts`` its Chart tab (:func:`view_charts`)."""
    mode = "&compareRunsMode=CHART" if charts else ""
    return f"/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}&{WORKFLOW}{mode}"


# ------------------------------------------------------------------------------ run names
def run_name(model, config_hash: str) -> str:
    """``<method>-<size>[-lam<lambda>][-L<l_max>]-<hash6>``: the settings that tell runs apart
    in a sweep, then the identity (two runs differing elsewhere still get distinct names)."""
    parts = [model.method, model.size]
    if model.method == "adaptive":
        parts.append(f"lam{model.halting.lambda_:g}")
    if model.method != "vanilla":
        parts.append(f"L{model.l_max}")
    parts.append(config_hash[:6])
    return "-".join(parts)


def describe_run(params: dict[str, Any], metrics: dict[str, float] | None = None) -> str:
    """A Markdown description for the run page: key settings, then final metrics if known."""
    lines = ["alcot training run", ""]
    lines += [f"* `{k}` = {params[k]}" for k in KEY_PARAMS if k in params]
    for k in KEY_METRICS:
        if metrics and k in metrics:
            lines.append(f"* final `{k}` = {metrics[k]:.4g}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ source tags
def _git(*args: str) -> str:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", *args], cwd=here, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def source_tags(entry: str | None = None, job: bool = False) -> dict[str, str]:
    """MLflow's standard source tags for a run started by ``entry`` (default: this command).

    ``mlflow.source.git.commit`` is what the UI shows as the code version; without a git
    checkout (an installed wheel, a container image) ``ALCOT_GIT_COMMIT`` may supply it.
    """
    from mlflow.utils import mlflow_tags as t

    if entry is None:
        argv = [Path(sys.argv[0]).name, *sys.argv[1:3]] if sys.argv and sys.argv[0] else []
        entry = " ".join(argv) or "alcot"
    tags = {
        t.MLFLOW_SOURCE_NAME: entry[:500],
        t.MLFLOW_SOURCE_TYPE: "JOB" if job else "LOCAL",
    }
    commit = os.environ.get("ALCOT_GIT_COMMIT") or _git("rev-parse", "HEAD")
    if commit:
        tags[t.MLFLOW_GIT_COMMIT] = commit
        branch = _git("rev-parse", "--abbrev-ref", "HEAD")
        if branch and branch != "HEAD":
            tags[t.MLFLOW_GIT_BRANCH] = branch
        url = _git("config", "--get", "remote.origin.url")
        if url:
            tags[t.MLFLOW_GIT_REPO_URL] = url
    with contextlib.suppress(KeyError, OSError):  # no passwd entry (some containers)
        tags[t.MLFLOW_USER] = getpass.getuser()
    return tags


# ------------------------------------------------------------------------------ dataset
def dataset_name(data_cfg) -> str:
    """The corpus's name as the UI shows it: ``builtin``, or the data path's last parts."""
    if data_cfg.source == "builtin":
        return "alcot-builtin"
    path = str(data_cfg.path or "").rstrip("/")
    name = "/".join(Path(path).parts[-2:]) if path else data_cfg.source
    return f"{data_cfg.source}:{name}"[:500]


def log_dataset(client, run_id: str, data_cfg, prepared) -> None:
    """Log the training corpus as the run's input (context ``train``), digest = cache key."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    profile = {
        "train_tokens": int(prepared.n_train),
        "val_tokens": int(prepared.n_val),
        "vocab_size": int(prepared.vocab_size),
    }
    source = {"source": data_cfg.source, "path": str(data_cfg.path or "")}
    dataset = Dataset(
        name=dataset_name(data_cfg),
        digest=prepared.key[:36],
        source_type="local" if data_cfg.source != "hf" else "hugging_face",
        source=json.dumps(source),
        schema=json.dumps({"tokens": {"dtype": str(prepared.dtype)}}),
        profile=json.dumps(profile),
    )
    tags = [InputTag(key="mlflow.data.context", value="train")]
    client.log_inputs(run_id, datasets=[DatasetInput(dataset=dataset, tags=tags)])


# ------------------------------------------------------------------------------ call sites
def start_tags(cfg, extra_tags: dict[str, str] | None = None) -> dict[str, str]:
    """Tags of a training run: source/git, user, and a description of its key settings. A
    sweep's trial (``alcot.sweep_id`` in ``extra_tags``) names its sweep as the source."""
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

    from alcot.orchestrator.config import flatten

    sweep = (extra_tags or {}).get("alcot.sweep_id")
    source = source_tags(f"alcot sweep {sweep}", job=True) if sweep else source_tags()
    return {**source, MLFLOW_RUN_NOTE: describe_run(flatten(cfg.to_dict()))}


def on_data(tracker, data_cfg, prepared) -> None:
    """After the data is prepared: the corpus as the run's dataset input. Never fatal."""
    try:
        log_dataset(tracker.client, tracker.run_id, data_cfg, prepared)
    except Exception as err:
        tracker.log(f"warning: could not log the dataset input ({type(err).__name__}: {err})")


def on_finished(
    tracker, cfg, settings: dict, result, log_weights: bool = True, retry_seconds=None
) -> None:
    """After a finished run: final metrics into its description and, with ``log_weights``, the
    final weights as an MLflow model. The model is an entry of the folder's delivery manifest
    (``artifacts.json``), logged by the run's delivery like any artifact: now if the store
    answers, else by a later delivery (``alcot tracking sync``, a resubmitted sweep). Never
    fatal: a model that cannot be logged is a warning and the run tag ``alcot.model_error``.
    ``retry_seconds`` is unused (the delivery retries); kept for callers."""
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

    from alcot.orchestrator.config import flatten

    tracker.set_tag(MLFLOW_RUN_NOTE, describe_run(flatten(settings), result.metrics))
    if not log_weights or result.checkpoint is None:
        return
    tracker.log_model(Path(result.checkpoint))
