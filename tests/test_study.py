"""The study's export and report: an experiment's runs round-trip through the portable export,
and the committed export of docs/study rebuilds the committed claims tables exactly."""

import gzip
import json
from pathlib import Path

import pytest

from alcot.analysis.load import AnalysisError
from alcot.analysis.study_export import export_runs, import_runs, read_export
from alcot.orchestrator.cli import main

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "docs" / "study"
EXPORT = STUDY / "data" / "study-cpu.json.gz"


def _store(tmp_path: Path, name: str) -> tuple[str, object]:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / name}.db"
    client = MlflowClient(tracking_uri=uri)
    return uri, client


def _fake_study(tmp_path: Path) -> str:
    """Two training runs (one adaptive with a depth sample, one vanilla logged twice at some
    steps, as a resumed run is) and a sweep parent run, in a fresh sqlite store."""
    from mlflow.entities import Metric

    uri, client = _store(tmp_path, "src")
    exp = client.create_experiment("s", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(exp, run_name="sweep", tags={"alcot.kind": "sweep"})
    client.set_terminated(parent.info.run_id)
    for method in ("adaptive", "vanilla"):
        run = client.create_run(
            exp,
            run_name=f"{method}-run",
            start_time=1_000_000,
            tags={"config_hash": f"{method}0123456789", "method": method, "size": "micro"},
        )
        rid = run.info.run_id
        client.log_param(rid, "model.method", method)
        client.log_param(rid, "train.lr", "0.003")
        metrics = [Metric("train/loss", 5.0 - s / 1000, 1_000_000 + s, s) for s in range(1, 301)]
        metrics += [Metric("val/loss", 5.0 - s / 500, 1_000_000 + s, s) for s in (7, 150, 300)]
        if method == "vanilla":  # a resumed run: steps 100-120 logged again, later values win
            metrics += [Metric("train/loss", 9.0, 2_000_000 + s, s) for s in range(100, 121)]
        for j in range(0, len(metrics), 1000):
            client.log_batch(rid, metrics=metrics[j : j + 1000])
        if method == "adaptive":
            csv = tmp_path / "token_depth.csv"
            csv.write_text("step0_loss,depth\n1.5,0\n4.0,3\n")
            client.log_artifact(rid, str(csv), "diagnostics")
        client.set_terminated(rid, "FINISHED", end_time=1_500_000)
    return uri


def test_export_round_trips_runs_histories_and_depth_samples(tmp_path):
    src = _fake_study(tmp_path)
    path = tmp_path / "export.json.gz"
    info = export_runs("s", path, src, max_points=50)
    assert info["runs"] == 2 and info["artifacts"] == 1  # the sweep parent is not exported
    again = tmp_path / "again.json.gz"
    export_runs("s", again, src, max_points=50)
    assert path.read_bytes() == again.read_bytes()  # byte-stable: committed exports diff cleanly

    doc = read_export(path)
    van = next(r for r in doc["runs"] if r["tags"]["method"] == "vanilla")
    steps = [s for s, _ in van["metrics"]["train/loss"]]
    assert len(steps) <= 50 + 4 and steps == sorted(set(steps))
    assert {7, 150, 300} <= set(steps)  # every evaluation step and the last one are kept
    kept = dict(map(tuple, van["metrics"]["train/loss"]))
    assert all(kept[s] == 9.0 for s in steps if 100 <= s <= 120)  # the later value won

    dst, client = _store(tmp_path, "dst")
    assert import_runs(path, dst, tmp_path / "art2") == "s"
    runs = client.search_runs([client.get_experiment_by_name("s").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["adaptive-run", "vanilla-run"]
    for r in runs:
        assert r.info.status == "FINISHED" and r.info.start_time == 1_000_000
        assert r.data.params["train.lr"] == "0.003"
        assert r.data.metrics["val/loss"] == pytest.approx(5.0 - 300 / 500)
        hist = client.get_metric_history(r.info.run_id, "val/loss")
        assert sorted(m.step for m in hist) == [7, 150, 300]
    ada = next(r for r in runs if r.data.tags["method"] == "adaptive")
    local = client.download_artifacts(ada.info.run_id, "diagnostics/token_depth.csv", tmp_path)
    assert Path(local).read_text() == "step0_loss,depth\n1.5,0\n4.0,3\n"
    with pytest.raises(AnalysisError, match="already exists"):
        import_runs(path, dst)


def test_bad_exports_are_refused_with_the_file_named(tmp_path, capsys):
    plain = tmp_path / "plain.json.gz"
    plain.write_text("{}")
    other = tmp_path / "other.json.gz"
    with gzip.open(other, "wt") as f:
        json.dump({"format": "something else"}, f)
    for path, why in [
        (tmp_path / "missing.json.gz", "does not exist"),
        (plain, "not a gzipped JSON"),
        (other, "not an alcot study export"),
    ]:
        with pytest.raises(AnalysisError, match=why):
            read_export(path)
        assert main(["study", "report", "--from", str(path), "--out", str(tmp_path / "o")]) == 2
        assert str(path) in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow  # a minute or more on two cores: out of the inner loop, in CI
def test_committed_export_rebuilds_the_committed_tables_exactly(tmp_path, capsys):
    """The command docs/study/README.md gives, into a temporary folder."""
    out = tmp_path / "study"
    args = ["study", "report", "--from", str(EXPORT), "--out", str(out)]
    args += ["--points", "all", "--bootstrap", "100"]
    assert main(args) == 0, capsys.readouterr().err
    committed = sorted(p.name for p in (STUDY / "tables").glob("*.csv"))
    rebuilt = sorted(p.name for p in (out / "tables").glob("*.csv"))
    assert committed and rebuilt == committed
    for name in committed:
        got, want = (out / "tables" / name).read_text(), (STUDY / "tables" / name).read_text()
        assert got == want, name


def test_diagnose_splits_the_gradient_and_logs_it_to_the_run(alcot_home, tmp_path, capsys):
    from conftest import small_run

    from alcot.orchestrator.tracking.stores import open_client
    from alcot.orchestrator.training_run import run_training

    run_dir = tmp_path / "run"
    cfg = small_run(run_dir, "model.halting.lambda=0.5", "tracking.experiment=diag-tests")
    out = run_training(cfg, progress=False, log=lambda *a: None)
    text = tmp_path / "held_out.txt"
    text.write_text(" ".join(f"Tom had {i} apples and ate {i % 3} of them." for i in range(200)))
    assert main(["diagnose", str(run_dir), "--text", str(text), "--batches", "2"]) == 0
    printed = dict(line.split() for line in capsys.readouterr().out.splitlines())
    assert float(printed["router_adapt_norm"]) > 0 and float(printed["router_ce_norm"]) > 0
    ratio = float(printed["router_adapt_norm"]) / float(printed["router_ce_norm"])
    assert float(printed["router_ratio"]) == pytest.approx(ratio, rel=0.6)  # mean of ratios
    assert -1.0 <= float(printed["backbone_cosine"]) <= 1.0
    import time

    for _ in range(100):  # the journal delivers in the background
        run = open_client(out.tracking_uri).get_run(out.run_id)
        if "diag/grad/router_ratio" in run.data.metrics:
            break
        time.sleep(0.1)
    assert run.data.metrics["diag/grad/router_ratio"] == pytest.approx(
        float(printed["router_ratio"]), rel=1e-4
    )
    assert list((run_dir / "diag").glob("*-grad.json"))

    van = tmp_path / "vanilla"
    run_training(small_run(van, "model.method=vanilla"), progress=False, log=lambda *a: None)
    assert main(["diagnose", str(van), "--text", str(text), "--no-log"]) == 2
    assert "no router" in capsys.readouterr().err


@pytest.mark.slow
def test_committed_token_study_export_gives_the_committed_token_multiple_table(tmp_path):
    """docs/study/tokens.md's table: the committed export of the token-multiple study, imported
    into a fresh store, gives tables/token_multiple.csv byte for byte."""
    from alcot.analysis.load import Study
    from alcot.analysis.token_multiple import token_multiples

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    name = import_runs(STUDY / "data" / "study-tokens.json.gz", uri, f"{tmp_path}/mlartifacts")
    study = Study.load(name, uri=uri)
    table = token_multiples(study.runs, "final/eval/wiki.test/ppl", 0.9)
    out = tmp_path / "token_multiple.csv"
    table.to_csv(out, index=False, float_format="%.4g", lineterminator="\n")
    committed = STUDY / "tokens" / "tables" / "token_multiple.csv"
    assert out.read_text() == committed.read_text()
    assert (table["seeds"] >= 3).all() and len(table.groupby(["size", "layers"])) >= 3
