"""A trained run's final weights as an MLflow model: a pyfunc wrapping
:class:`AlcotPyfuncModel` that loads back with ``mlflow.pyfunc.load_model`` and can be
registered. The model is an entry of the run folder's delivery manifest, logged by the run's
tracker like any artifact (now, or by a later delivery); tensor-parallel and pipeline shards are
joined into one-process weights (``alcot.model.layouts``).
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import mlflow.pyfunc

from alcot.orchestrator.tracking.metadata import MODEL_NAME, MODEL_URI_TAG


def model_problem(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` can never be logged as a model (it does not verify, or its rank
    files do not make a layout), or None."""
    from alcot.model.checkpoints import verify
    from alcot.model.layouts import saved_layout

    try:
        verify(Path(checkpoint))
        saved_layout(Path(checkpoint))
    except ValueError as err:
        return str(err)
    return None


def deliver_model(tracker, run_id: str, checkpoint: Path) -> str:
    """Log the folder's model (``checkpoint`` with the folder's ``config.yaml``) on
    ``run_id`` and tag the run with its URI; called by the Tracker's delivery (which checks
    :func:`model_problem` first). A store error propagates: the delivery retries."""
    import yaml

    settings = yaml.safe_load((tracker.run_dir / "config.yaml").read_text())
    uri = log_model(tracker.uri, run_id, checkpoint, settings)
    tracker.client.set_tag(run_id, MODEL_URI_TAG, uri)
    return uri


# ------------------------------------------------------------------------------ the model
warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method.*")


class AlcotPyfuncModel(mlflow.pyfunc.PythonModel):
    """A trained alcot model as an MLflow pyfunc.

    Input: token ids (a 2-D array, a list of lists, or a DataFrame with an ``input_ids`` column
    of equal-length lists). Output: a DataFrame with each sequence's ``next_token`` (the argmax
    after its last position) and ``mean_depth`` (executed latent steps per token).
    """

    def load_context(self, context):
        import torch

        from alcot.model import AlcotModel, ModelConfig, init_parallel

        settings = json.loads(Path(context.artifacts["config"]).read_text())
        init_parallel(1)
        # the weights are full (one-process) tensors, whatever layout the run trained at
        one = {"tensor_parallel_size": 1, "pipeline_parallel_size": 1}
        self.model = AlcotModel(ModelConfig.from_dict({**settings["model"], **one}))
        state = torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
        self.model.load_state_dict(state)
        self.model.eval()

    def predict(self, context, model_input, params=None):
        import numpy as np
        import pandas as pd
        import torch

        if isinstance(model_input, pd.DataFrame):
            col = "input_ids" if "input_ids" in model_input else None
            rows = list(model_input[col]) if col else model_input.to_numpy().tolist()
        else:
            rows = np.asarray(model_input).tolist()
        ids = torch.tensor([list(r) for r in rows], dtype=torch.long)
        if ids.dim() != 2:
            raise ValueError("expected token ids of shape [batch, sequence]")
        with torch.no_grad():
            out = self.model(ids, return_logits=True)
        return pd.DataFrame(
            {
                "next_token": out.logits[:, -1].argmax(-1).tolist(),
                "mean_depth": out.depth.float().mean(-1).tolist(),
            }
        )


def log_model(
    tracking_uri: str, run_id: str, checkpoint: Path, settings: dict, name: str = MODEL_NAME
) -> str:
    """Log the weights in ``checkpoint`` (an alcot checkpoint folder at any tensor x pipeline
    layout, joined into one-process tensors by ``layouts.full_model_state``) with the resolved
    run ``settings`` as an MLflow pyfunc model on ``run_id``; returns its
    ``models:/<model id>`` URI (load it with ``mlflow.pyfunc.load_model``, register it with
    ``mlflow.register_model``)."""
    import torch

    from alcot.model.layouts import full_model_state, partitions_of, saved_layout

    tp, _, _ = saved_layout(Path(checkpoint))
    # how the sharded weights were split: read off the model the settings describe (built in
    # a process of its own); a checkpoint without tensor-parallel shards needs no rule
    rules = partitions_of(settings["model"]) if tp > 1 else {}
    state = full_model_state(Path(checkpoint), rules)
    reqs = [f"torch=={torch.__version__.split('+')[0]}", "megatron-core", "pyyaml"]
    version = _installed_version()
    if version:
        reqs.insert(0, f"alcot=={version}")
    # mlflow.set_tracking_uri is process-global and also sets $MLFLOW_TRACKING_URI (which
    # alcot reads to choose the store of the next run): put both back exactly afterwards.
    from mlflow.tracking._tracking_service import utils as tracking_utils

    previous = getattr(tracking_utils, "_tracking_uri", None)
    previous_env = os.environ.get("MLFLOW_TRACKING_URI")
    with tempfile.TemporaryDirectory(prefix="alcot-model-") as tmp:
        weights, config = Path(tmp) / "weights.pt", Path(tmp) / "config.json"
        torch.save(state, weights)
        config.write_text(json.dumps(settings))
        mlflow.set_tracking_uri(tracking_uri)
        try:
            # Through the run as the active run, so that the logged model belongs to the run's
            # experiment (the UI lists a run's models from there). The run is left RUNNING:
            # its delivery sets the final status once everything else is there too (a run
            # marked FINISHED early would be skipped by a resubmitted sweep while it still
            # lacks metrics).
            mlflow.start_run(run_id=run_id)
            try:
                info = mlflow.pyfunc.log_model(
                    name=name,
                    python_model=AlcotPyfuncModel(),
                    artifacts={"weights": str(weights), "config": str(config)},
                    pip_requirements=reqs,
                )
            finally:
                mlflow.end_run(status="RUNNING")
        finally:
            mlflow.set_tracking_uri(previous)
            if previous_env is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = previous_env
    return info.model_uri


def _installed_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("alcot")
    except PackageNotFoundError:
        return None
