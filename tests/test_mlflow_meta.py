"""What the MLflow UI reads from a training run: experiment kind, run name, description, source
and git tags, the dataset input with its digest, and the final weights as a model that loads
back, predicts and can be registered."""

import json
import os

import numpy as np
from conftest import small_run, spread_router, tiny_config
from mlflow.tracking import MlflowClient

from alcot.orchestrator.tracking.stores import default_store


def _client(home):
    from mlflow.tracking import MlflowClient

    from alcot.orchestrator.tracking.stores import default_store

    return MlflowClient(default_store(home)[0])


def test_a_finished_run_shows_what_the_ui_needs(alcot_home, tmp_path):
    import mlflow

    from alcot.orchestrator.tracking import metadata as mlflow_meta
    from alcot.orchestrator.training_run import run_training

    cfg = small_run(tmp_path / "run", "tracking.experiment=meta", "model.halting.lambda=0.03")
    assert "MLFLOW_TRACKING_URI" not in os.environ
    outcome = run_training(cfg, progress=False, log=lambda *a: None)
    assert outcome.result.status == "finished"
    # logging the model (MLflow's fluent API) leaves no tracking URI behind for the next run
    assert "MLFLOW_TRACKING_URI" not in os.environ
    client = _client(alcot_home)
    exp = client.get_experiment_by_name("meta")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(exp.tags["mlflow.sharedViewState.alcot-runs"])
    assert "metrics.`val/ppl`" in view["selectedColumns"]
    assert "params.`model.halting.lambda`" in view["selectedColumns"]
    # the scaling study's charts in the same view; each names a param or metric a run logs
    charts = {c["type"]: c for c in view["compareRunCharts"]}
    assert sorted(charts) == ["LINE", "PARALLEL", "SCATTER"]
    line = charts["LINE"]
    assert (line["metricKey"], line["xAxisKey"]) == ("val/ppl", "metric")
    assert (
        line["selectedXAxisMetricKey"] == "flops/realised_log10" and not line["useGlobalXaxisKey"]
    )
    assert charts["SCATTER"]["xaxis"] == {"key": "flops/realised_log10", "type": "METRIC"}
    assert charts["SCATTER"]["yaxis"] == {"key": "val/ppl", "type": "METRIC"}
    sections = {s["uuid"] for s in view["compareRunSections"]}
    assert all(c["metricSectionId"] in sections for c in view["compareRunCharts"])

    run = client.get_run(outcome.run_id)
    parallel = charts["PARALLEL"]
    assert parallel["selectedParams"] == ["model.size", "model.method", "model.halting.lambda"]
    assert set(parallel["selectedParams"]) <= set(run.data.params)
    assert {"val/ppl", "flops/realised"} <= set(run.data.metrics)
    # log10 FLOPs (the charts' x-axis) at every evaluation, the same steps as val/ppl
    ppl = {m.step for m in client.get_metric_history(outcome.run_id, "val/ppl")}
    flops = {m.step: m.value for m in client.get_metric_history(outcome.run_id, "flops/realised")}
    log10 = client.get_metric_history(outcome.run_id, "flops/realised_log10")
    assert {m.step for m in log10} == ppl and len(ppl) >= 2
    assert all(abs(m.value - np.log10(flops[m.step])) < 1e-9 for m in log10)
    assert run.info.run_name == f"adaptive-tiny-lam0.03-L2-{outcome.config_hash[:6]}"
    tags = run.data.tags
    assert tags["mlflow.source.type"] == "LOCAL"
    assert len(tags["mlflow.source.git.commit"]) == 40  # the test runs from a git checkout
    note = tags["mlflow.note.content"]
    assert "`model.halting.lambda` = 0.03" in note
    ppl = run.data.metrics["val/ppl"]
    assert f"final `val/ppl` = {ppl:.4g}" in note

    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1
    ds = inputs[0].dataset
    assert ds.name == "alcot-builtin"
    assert ds.digest and len(ds.digest) >= 16
    assert json.loads(ds.profile)["train_tokens"] > 0
    assert {t.key: t.value for t in inputs[0].tags}["mlflow.data.context"] == "train"

    # the final weights load back and predict like the trained model would
    uri = tags[mlflow_meta.MODEL_URI_TAG]
    assert uri.startswith("models:/")
    assert [o.model_id for o in run.outputs.model_outputs] == [uri.split("/")[-1]]
    mlflow.set_tracking_uri(client.tracking_uri)
    try:
        logged = mlflow.get_logged_model(uri.split("/")[-1])
        # in the run's experiment, from the run: what the UI's Models column looks for
        assert logged.experiment_id == exp.experiment_id
        assert logged.source_run_id == outcome.run_id
        model = mlflow.pyfunc.load_model(uri)
        ids = np.random.default_rng(0).integers(0, 500, size=(2, 16))
        out = model.predict(ids)
        assert list(out.columns) == ["next_token", "mean_depth"] and len(out) == 2
        assert all(0 <= d <= 2 for d in out["mean_depth"])  # l_max=2
        version = mlflow.register_model(uri, "alcot-meta-test")
        assert str(version.version) == "1" and version.status == "READY"
        assert client.get_registered_model("alcot-meta-test").name == "alcot-meta-test"
    finally:
        mlflow.set_tracking_uri(None)

    # a second run of the same data shares the digest; an experiment made before the tags
    # existed gets them when alcot uses it again
    old = client.create_experiment("made-before")
    from alcot.orchestrator.tracking.stores import ensure_experiment

    assert ensure_experiment(client, "made-before", None) == old
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"


def test_run_names_tell_the_trials_of_a_sweep_apart():
    from alcot.model import ModelConfig
    from alcot.orchestrator.tracking.metadata import run_name

    h = "0123456789abcdef"
    assert run_name(ModelConfig.from_dict({"method": "vanilla", "size": "mini"}), h) == (
        "vanilla-mini-012345"
    )
    looped = ModelConfig.from_dict({"method": "looped", "size": "micro", "l_max": 4})
    assert run_name(looped, h) == "looped-micro-L4-012345"


def test_a_tensor_and_pipeline_sharded_checkpoint_is_logged_whole(alcot_home, tmp_path, build):
    """A checkpoint written at tensor x pipeline = 2 x 2 (its rank files made by hand with the
    layouts module's split) is logged as the full one-process weights, and loads back."""
    import mlflow
    import torch

    from alcot.model.layouts import partitions, rank_file, tp_split
    from alcot.orchestrator.export.mlflow_model import log_model
    from alcot.orchestrator.tracking.stores import ensure_experiment

    model = build(method="adaptive")
    spread_router(model)
    full = {n: t for n, t in model.state_dict().items() if isinstance(t, torch.Tensor)}
    rules = partitions(model)
    assert rules and any(stride == 2 for _, stride in rules.values())  # SwiGLU's fc1 too
    ckpt = tmp_path / "step_00000004"
    ckpt.mkdir()
    for p in range(2):  # stage 0: layer 0 and the embedding; stage 1: layer 1, norm, head
        stage = {
            n: t
            for n, t in model.state_dict().items()
            if (n.startswith("block.layers.1.") or not n.startswith(("block.layers.", "emb")))
            == (p == 1)
        }
        for t in range(2):
            shard = {n: tp_split(v, *rules[n], t, 2) if n in rules else v for n, v in stage.items()}
            torch.save({"model": shard}, ckpt / rank_file(t, p, 2))

    settings = {"model": {**tiny_config(method="adaptive").to_dict(), "tensor_parallel_size": 2}}
    settings["model"]["pipeline_parallel_size"] = 2
    uri, artifacts = default_store(alcot_home)
    client = MlflowClient(uri)
    run_id = client.create_run(ensure_experiment(client, "tp-model", artifacts)).info.run_id
    model_uri = log_model(uri, run_id, ckpt, settings)
    mlflow.set_tracking_uri(uri)
    try:
        logged = mlflow.pyfunc.load_model(model_uri).unwrap_python_model().model
    finally:
        mlflow.set_tracking_uri(None)
    got = {n: t for n, t in logged.state_dict().items() if isinstance(t, torch.Tensor)}
    assert sorted(got) == sorted(full)
    for name, t in full.items():
        assert torch.equal(got[name], t), name
