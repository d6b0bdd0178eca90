"""Loading MLflow runs into pandas (runs written directly with the MLflow client)."""

import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from alcot.analysis.load import AnalysisError, load_histories, load_runs


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("study", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(exp, tags={"alcot.kind": "sweep", "alcot.sweep_id": "s1"})
    for i, (method, lam) in enumerate([("vanilla", 0.01), ("adaptive", 0.1), ("adaptive", 0.3)]):
        run = client.create_run(
            exp,
            run_name=f"{method}-{i}",
            tags={
                "config_hash": f"{i:040d}",
                "method": method,
                "size": "micro",
                "alcot.sweep_id": "s1",
                "mlflow.parentRunId": parent.info.run_id,
            },
        )
        client.log_batch(
            run.info.run_id,
            params=[
                Param("model.method", method),
                Param("model.halting.lambda", str(lam)),
                Param("params.non_embedding", "106816"),
                Param("model.l_max", "3"),
            ],
        )
        metrics = [Metric("train/loss", 5.0 - s * 0.1, 1000 + s, s) for s in range(1, 6)]
        # a resumed run logged steps 4 and 5 again, later: the later values win
        metrics += [Metric("train/loss", 9.0, 2000 + s, s) for s in (4, 5)]
        metrics.append(Metric("val/ppl", 20.0 - i, 3000, 5))
        client.log_batch(run.info.run_id, metrics=metrics)
        client.set_terminated(run.info.run_id)
    return uri


def test_one_row_per_training_run(store):
    runs = load_runs("study", uri=store)
    assert len(runs) == 3  # the sweep's parent run is not a training run
    assert sorted(runs["method"]) == ["adaptive", "adaptive", "vanilla"]
    assert set(runs["lambda"]) == {0.01, 0.1, 0.3}
    assert (runs["params"] == 106816).all() and (runs["status"] == "FINISHED").all()
    assert sorted(runs["final/val/ppl"]) == [18.0, 19.0, 20.0]
    assert len(load_runs("study", sweep_id="s1", uri=store)) == 3


def test_histories_are_deduplicated_by_step(store):
    hist = load_histories("study", ["train/loss"], uri=store)
    assert len(hist) == 3 * 5
    one = hist[hist.run_id == hist.run_id.iloc[0]].set_index("step")["value"]
    assert list(one.index) == [1, 2, 3, 4, 5]
    assert one[4] == 9.0 and one[5] == 9.0 and one[3] == pytest.approx(4.7)


def test_clear_errors(store):
    with pytest.raises(AnalysisError, match="does not exist"):
        load_runs("nothing", uri=store)
    with pytest.raises(AnalysisError, match="no training runs for sweep zz"):
        load_runs("study", sweep_id="zz", uri=store)
    with pytest.raises(AnalysisError, match="logged val/loss"):
        load_histories("study", ["val/loss"], uri=store)
