"""Fenced leases: a trainer frozen past its lease ttl and replaced writes nothing more when it
wakes. And the model is part of the folder's delivery manifest: a tracking store that is away
at the end of a run gets the model (and every artifact) with a later ``alcot tracking sync``."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import SMALL_RUN, MlflowServer, home_at, small_run

from alcot.model import checkpoints
from alcot.orchestrator.cli import main
from alcot.orchestrator.tracking.lease import Lease, LeaseLost, read_holder
from alcot.orchestrator.tracking.run_folder import read_journal
from alcot.orchestrator.tracking.stores import open_client

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SETS = [a for s in SMALL_RUN for a in ("--set", s)]


def test_each_claim_takes_a_new_generation_and_a_replaced_holder_is_fenced(tmp_path):
    a = Lease(tmp_path, label="a", ttl=0.6)
    assert a.try_acquire() is None and a.generation == 1
    a.check()  # ours: no error
    a._stop.set()  # a frozen holder: no more heartbeats
    a._thread.join()
    time.sleep(0.8)
    b = Lease(tmp_path, label="b", ttl=0.6)  # ttl: what b deems stale
    assert b.try_acquire() is None and b.generation == 2  # the stale lease is taken over
    with pytest.raises(LeaseLost, match="lost its lease"):
        a.check()  # a wakes: fenced before its next write
    with pytest.raises(LeaseLost):
        a.check()  # and stays fenced
    a.release()  # leaves b's lease alone
    assert read_holder(tmp_path).label == "b" and read_holder(tmp_path).generation == 2
    b.release()
    c = Lease(tmp_path, label="c", ttl=30)
    assert c.try_acquire() is None and c.generation == 3  # generations never repeat
    c.release()


def test_a_woken_holder_renews_before_anyone_took_over(tmp_path):
    """Frozen past ttl but nobody came: the lease is still its own, and check renews it (so a
    passing check leaves at least ttl / 2 before anyone may take over)."""
    a = Lease(tmp_path, label="a", ttl=0.6)
    assert a.try_acquire() is None
    a._stop.set()
    a._thread.join()
    time.sleep(0.8)
    assert not read_holder(tmp_path).alive(0.6)
    a.check()
    assert read_holder(tmp_path).alive(0.6)
    a.release()


@pytest.fixture
def server(tmp_path):
    srv = MlflowServer(tmp_path / "server")
    srv.root.mkdir()
    yield srv
    srv.stop()


def train_cmd(run: Path, steps: int) -> list[str]:
    return [
        str(BIN / "alcot"), "train", "configs/train_adaptive.yaml", *SETS,
        "--set", f"train.steps={steps}", "--set", "train.checkpoint_every=5",
        "--set", f"out_dir={run}", "--no-progress",
    ]  # fmt: skip


def wait_rows(run: Path, n: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while len(read_journal(run)) < n:
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.time() < deadline, f"fewer than {n} journal rows after {timeout} s"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_trainer_frozen_past_its_lease_is_replaced_and_writes_nothing_when_it_wakes(
    tmp_path, server
):
    """SIGSTOP a trainer past ALCOT_LEASE_TTL, let a second process take the folder over and
    finish, SIGCONT the first: it exits with a clear message before writing again; the journal
    has each (metric, step) once, every checkpoint loads, the MLflow run is FINISHED, once.
    A tracking server, not the embedded sqlite file: a client frozen mid-transaction would hold
    the sqlite file's lock, and the second process could deliver nothing until it woke."""
    home, run, steps = tmp_path / "home", tmp_path / "run", 60
    server.start()
    env = dict(
        os.environ, ALCOT_HOME=str(home), ALCOT_LEASE_TTL="3", MLFLOW_TRACKING_URI=server.uri
    )
    first = subprocess.Popen(
        train_cmd(run, steps), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        wait_rows(run, 12, first)  # past two checkpoints
        first.send_signal(signal.SIGSTOP)
        frozen_at = max(row["step"] for row in read_journal(run))
        time.sleep(4.5)  # past the ttl: the lease is stale
        second = subprocess.run(
            train_cmd(run, steps), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
        )
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
        assert "resumed from" in second.stdout + second.stderr
    finally:
        first.send_signal(signal.SIGCONT)
    out = first.communicate(timeout=300)[0].decode()
    assert first.returncode == 3, out[-3000:]
    assert "lost its lease" in out and "Stopping without writing" in out, out[-3000:]

    rows = read_journal(run)
    pairs = [(key, row["step"]) for row in rows for key in row["metrics"]]
    assert len(pairs) == len(set(pairs))  # each (metric, step) once
    assert sorted({row["step"] for row in rows}) == list(range(1, steps + 1))
    writers = [row["writer"] for row in rows]
    assert writers == sorted(writers) and len(set(writers)) == 2  # never interleaved
    assert max(r["step"] for r in rows if r["writer"] == writers[0]) == frozen_at
    for path in sorted((run / "checkpoints").glob("step_*")):  # every checkpoint loads
        info = checkpoints.verify(path)
        torch.load(path / "tp0.pt", map_location="cpu", weights_only=True)
        assert info.step % 5 == 0
    client = open_client(server.uri)
    exp = client.get_experiment_by_name("tests")
    found = client.search_runs([exp.experiment_id])
    assert len(found) == 1 and found[0].info.status == "FINISHED"
    history = client.get_metric_history(found[0].info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, steps + 1))  # once each
    assert json.loads((run / "run_status.json").read_text())["status"] == "FINISHED"
    assert not (run / "lease.json").exists()


# ---------------------------------------------------------------------------- delivery
@pytest.mark.slow
def test_model_and_artifacts_of_a_run_ending_in_an_outage_are_delivered_by_sync(tmp_path, server):
    """The server is away when the run ends: the model and every artifact stay in the folder's
    manifest; `alcot tracking sync` (server back) logs the model and uploads the artifacts, and
    only then is the run FINISHED."""
    from alcot.orchestrator.training_run import run_training

    run = tmp_path / "run"
    with home_at(tmp_path / "home"):
        os.environ["ALCOT_TRACKING_PATIENCE"] = "1"
        try:
            server.start()
            cfg = small_run(run, f"tracking.uri={server.uri}")
            logs: list[str] = []

            def stop_at_the_end(step, metrics):
                if step == 19:  # the last steps, the model and the artifacts find it away
                    server.stop()

            import alcot.orchestrator.training_run as train_mod

            real_train = train_mod.train

            def train_then(*args, **kwargs):
                kwargs["callbacks"] = [*kwargs["callbacks"], _Hook(stop_at_the_end)]
                return real_train(*args, **kwargs)

            train_mod.train = train_then
            try:
                out = run_training(cfg, progress=False, log=logs.append)
            finally:
                train_mod.train = real_train
        finally:
            del os.environ["ALCOT_TRACKING_PATIENCE"]
        assert out.result.status == "finished" and not out.all_metrics_sent, logs
        assert "model from checkpoints/step_00000020" in out.owed.artifacts, out.owed
        manifest = json.loads((run / "artifacts.json").read_text())
        assert {"path": "checkpoints/step_00000020", "artifact_path": None, "kind": "model"} in (
            manifest
        )
        run_id = out.run_id
        server.start()
        assert open_client(server.uri).get_run(run_id).info.status == "RUNNING"
        assert main(["tracking", "sync", str(run)]) == 0
        assert main(["tracking", "sync", str(run)]) == 0  # again: nothing twice
    client = open_client(server.uri)
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED"
    model_uri = got.data.tags["alcot.model_uri"]
    assert model_uri.startswith("models:/"), got.data.tags.get("alcot.model_error")
    import mlflow

    mlflow.set_tracking_uri(server.uri)
    try:
        models = mlflow.search_logged_models(
            experiment_ids=[got.info.experiment_id], output_format="list"
        )
        assert [m.source_run_id for m in models] == [run_id]  # logged once
        model = mlflow.pyfunc.load_model(model_uri)
        pred = model.predict([[1, 2, 3, 4]])
        assert len(pred["next_token"]) == 1
    finally:
        mlflow.set_tracking_uri(None)
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "depth_histogram.png", "diagnostics"} <= names, names
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == list(
        range(1, 21)
    )


def _Hook(fn):
    from alcot.model.trainer import Callback

    class Hook(Callback):
        def on_step_end(self, step, metrics):
            fn(step, metrics)

    return Hook()


def test_a_model_whose_checkpoint_does_not_verify_is_an_error_tag_not_a_retry(tmp_path):
    from alcot.orchestrator.tracking.tracker import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = tmp_path / "run"
    bad = run / "checkpoints" / "step_00000005"
    bad.mkdir(parents=True)
    (bad / "tp0.pt").write_bytes(b"garbage")
    (bad / "meta.json").write_text('{"step": 5, "files": {"tp0.pt": "0"}}')
    logs: list[str] = []
    tracker = Tracker(uri, "tests", run, "badmodel", flush_seconds=0.05, log=logs.append)
    tracker.on_metrics(1, {"train/loss": 1.0})
    tracker.log_model(bad)
    assert tracker.finish("FINISHED", timeout=30)
    got = open_client(uri).get_run(tracker.run_id)
    assert got.info.status == "FINISHED"
    assert "checksum mismatch" in got.data.tags["alcot.model_error"]
    assert "alcot.model_uri" not in got.data.tags
    assert any("could not log the model" in line for line in logs), logs


def test_a_process_fenced_while_it_searched_for_its_run_creates_none(tmp_path, monkeypatch):
    # Frozen while the search for the folder's run was in flight, replaced, woken: the search
    # came back empty (the new holder had not made the run yet), and the woken process must not
    # make a second run for the folder (a chaos soak counted one such duplicate).
    from alcot.orchestrator.tracking.tracker import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    lost = []

    def fence():
        if lost:
            raise LeaseLost("taken over")

    def search_then_lose(self, exp_id):
        lost.append(True)
        return None

    monkeypatch.setattr(Tracker, "_created_earlier", search_then_lose)
    tracker = Tracker(uri, "tests", tmp_path / "run", "fenced", flush_seconds=0.05, fence=fence)
    assert isinstance(tracker.fenced, LeaseLost)
    assert tracker.run_id is None
    tracker.abandon()
    client = open_client(uri)
    exp = client.get_experiment_by_name("tests")
    assert client.search_runs([exp.experiment_id]) == []
