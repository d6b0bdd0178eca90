"""The records under faults, one run at a time (the sweep-level cases are in test_sweep_run):
two processes on one run folder, a tracking server that goes away, a switch of tracking store,
hostile study names, bad data. Each case reproduces a way records were lost or duplicated."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SMALL_RUN, MlflowServer, home_at, small_run

from alcot.common.typed import ConfigError
from alcot.orchestrator.cli import main
from alcot.orchestrator.tracking.run_folder import read_journal
from alcot.orchestrator.tracking.stores import open_client

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SETS = [a for s in SMALL_RUN for a in ("--set", s)]


def train_cmd(*extra: str) -> list[str]:
    return [
        str(BIN / "alcot"),
        "train",
        "configs/train_adaptive.yaml",
        *SETS,
        *extra,
        "--no-progress",
    ]


def experiment_runs(uri: str, name: str = "tests"):
    client = open_client(uri)
    exp = client.get_experiment_by_name(name)
    return [] if exp is None else client.search_runs([exp.experiment_id])


def steps_of(uri: str, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in open_client(uri).get_metric_history(run_id, key))


# ---------------------------------------------------------------------------- concurrency
@pytest.mark.slow
def test_two_processes_on_one_run_train_it_once(tmp_path):
    """Two `alcot train` of one config started 0.5 s apart on a fresh store: the store is
    created once, one process trains, the other waits for it and trains nothing."""
    home = tmp_path / "home"
    env = dict(os.environ, ALCOT_HOME=str(home))
    cmd = train_cmd("--set", "train.steps=30")
    first = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    time.sleep(0.5)
    second = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    logs = [p.communicate(timeout=400)[0].decode() for p in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], "\n".join(logs)[-4000:]
    assert sum("not training again" in log for log in logs) == 1, logs
    uri = f"sqlite:///{home / 'mlflow.db'}"
    runs = experiment_runs(uri)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # duplicate runs: 0
    assert steps_of(uri, runs[0].info.run_id, "train/loss") == list(range(1, 31))
    folder = Path(runs[0].data.tags["alcot.out_dir"])
    steps = [row["step"] for row in read_journal(folder)]
    assert sorted(steps) == list(range(1, 31))  # every step trained exactly once
    assert not (folder / "lease.json").exists()


def test_lease_is_exclusive_and_a_dead_holder_is_replaced(tmp_path):
    from alcot.orchestrator.tracking.lease import Lease, read_holder

    a = Lease(tmp_path, label="a", ttl=30)
    assert a.try_acquire() is None
    b = Lease(tmp_path, label="b", ttl=30)
    holder = b.try_acquire()
    assert holder is not None and holder.label == "a"  # held by a live process
    a.release()
    assert b.try_acquire() is None and read_holder(tmp_path).label == "b"
    b.release()
    # a holder that was SIGKILLed: on the same host its lease is free at once, not after ttl
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from alcot.orchestrator.tracking.lease import Lease; "
            f"Lease({str(tmp_path)!r}, label='victim', ttl=30).try_acquire(); "
            "print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout.readline().strip() == b"held"
    assert Lease(tmp_path, ttl=30).try_acquire().label == "victim"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    c = Lease(tmp_path, label="c", ttl=30)
    assert c.try_acquire() is None
    c.release()


# ---------------------------------------------------------------------------- store switch
def test_switching_tracking_store_imports_the_run(tmp_path, monkeypatch):
    """A run tracked in one store, then run again with MLFLOW_TRACKING_URI naming another: the
    second store gets a run with every metric, param and artifact, and nothing is trained."""
    with home_at(tmp_path / "home"):
        run_dir = tmp_path / "run"
        logs: list[str] = []
        first = run_training_quiet(small_run(run_dir), logs)
        other = f"sqlite:///{tmp_path / 'team' / 'mlflow.db'}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
        again = run_training_quiet(small_run(run_dir), logs)
    assert any("was tracked in" in line for line in logs), logs
    assert again.all_metrics_sent and again.run_id != first.run_id
    run = open_client(other).get_run(again.run_id)
    assert run.info.status == "FINISHED"
    assert steps_of(other, again.run_id, "train/loss") == list(range(1, 21))
    assert steps_of(other, again.run_id, "val/loss") == [10, 20]
    assert run.data.params["model.method"] == "adaptive"
    assert run.data.tags["config_hash"] == first.config_hash
    names = {a.path for a in open_client(other).list_artifacts(again.run_id)}
    assert {"config.yaml", "depth_histogram.png", "diagnostics"} <= names
    # artifacts stay beside the new store, never in ./mlruns of the working directory
    assert (tmp_path / "team" / "mlartifacts").is_dir()
    assert not (Path.cwd() / "mlruns").exists()
    steps = [row["step"] for row in read_journal(run_dir)]
    assert sorted(steps) == list(range(1, 21))  # not trained again


def run_training_quiet(cfg, logs):
    from alcot.orchestrator.training_run import run_training

    return run_training(cfg, progress=False, log=logs.append)


# ---------------------------------------------------------------------------- outages
@pytest.fixture
def server(tmp_path):
    srv = MlflowServer(tmp_path / "server")
    srv.root.mkdir()
    yield srv
    srv.stop()


@pytest.mark.slow
def test_outage_longer_than_the_run_end_is_delivered_later(tmp_path, server):
    """The server goes away mid-run and stays away past the run's end: training finishes all
    the same, the MLflow run is NOT marked FINISHED while it lacks steps, and running the same
    command again (or `alcot tracking sync`) delivers everything without training again."""
    home = tmp_path / "home"
    env = dict(
        os.environ,
        ALCOT_HOME=str(home),
        MLFLOW_TRACKING_URI=server.uri,
        ALCOT_TRACKING_PATIENCE="2",
    )
    cmd = train_cmd("--set", "train.steps=40", "--set", f"out_dir={tmp_path / 'run'}")
    server.start()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.time() + 300
    while time.time() < deadline and len(read_journal(tmp_path / "run")) < 5:
        assert proc.poll() is None, proc.stdout.read().decode()
        time.sleep(0.05)
    server.stop()
    log = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, log  # training does not fail for the tracker
    assert "unreachable" in log and "not yet in" in log
    record = json.loads((tmp_path / "run" / "tracking.json").read_text())
    server.start()
    run_id = record["run_id"]
    assert open_client(server.uri).get_run(run_id).info.status == "RUNNING"  # not FINISHED
    before = len(steps_of(server.uri, run_id, "train/loss"))
    assert before < 40  # the outage's steps are owed
    print(f"outage: train/loss points in MLflow after the run: {before} of 40", end="; ")
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "not training again" in again.stdout
    run = open_client(server.uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert steps_of(server.uri, run_id, "train/loss") == list(range(1, 41))  # missing: 0 of 40
    print("after running the command again: 40 of 40, status FINISHED")
    assert steps_of(server.uri, run_id, "val/loss") == [10, 20, 30, 40]
    names = {a.path for a in open_client(server.uri).list_artifacts(run_id)}
    assert {"config.yaml", "depth_histogram.png", "diagnostics"} <= names


@pytest.mark.slow
def test_run_started_during_an_outage_trains_and_is_created_later(tmp_path, server):
    with home_at(tmp_path / "home"):
        os.environ["ALCOT_TRACKING_PATIENCE"] = "1"
        try:
            cfg = small_run(tmp_path / "run", f"tracking.uri={server.uri}")
            logs: list[str] = []
            out = run_training_quiet(cfg, logs)  # the server is not running at all
        finally:
            del os.environ["ALCOT_TRACKING_PATIENCE"]
        assert out.result.status == "finished" and not out.all_metrics_sent
        assert out.run_id is None and any("unreachable" in line for line in logs)
        server.start()
        assert main(["tracking", "sync", str(tmp_path / "run")]) == 0
    runs = experiment_runs(server.uri)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert steps_of(server.uri, runs[0].info.run_id, "train/loss") == list(range(1, 21))


class _LostAnswer:
    """A client whose first ``create_run`` reaches the store but whose answer is lost, as when
    the server is stopped between committing the run and replying."""

    def __init__(self, client):
        self._client, self.lost = client, 0

    def __getattr__(self, name):
        return getattr(self._client, name)

    def create_run(self, *args, **kwargs):
        run = self._client.create_run(*args, **kwargs)
        if not self.lost:
            self.lost += 1
            raise ConnectionError("connection reset (the run was committed)")
        return run


def test_a_run_created_but_unanswered_is_taken_over_not_duplicated(tmp_path, monkeypatch):
    """The store commits the run and the answer never arrives: the next delivery attempt finds
    that run by the folder's tag and delivers into it; the store ends with exactly one run,
    FINISHED, holding every step."""
    import alcot.orchestrator.tracking.tracker as tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    real_open = tracking.open_client
    clients: list[_LostAnswer] = []

    def lossy_open(u):
        clients.append(_LostAnswer(real_open(u)))
        return clients[-1]

    monkeypatch.setattr(tracking, "open_client", lossy_open)
    logs: list[str] = []
    tracker = tracking.Tracker(
        uri,
        "tests",
        tmp_path / "run",
        "lossy",
        flush_seconds=0.05,
        log=logs.append,
        params={"model.method": "adaptive"},
    )
    assert clients[0].lost == 1 and tracker.run_id is None  # the first answer was lost
    for step in range(1, 6):
        tracker.on_metrics(step, {"train/loss": 1.0 / step})
    assert tracker.finish("FINISHED", timeout=30)
    runs = experiment_runs(uri)
    assert [r.info.run_id for r in runs] == [tracker.run_id], logs
    assert runs[0].info.status == "FINISHED"
    assert runs[0].data.tags[tracking.FOLDER_TAG] == tracker.folder_id
    assert runs[0].data.params == {"model.method": "adaptive"}
    assert steps_of(uri, tracker.run_id, "train/loss") == [1, 2, 3, 4, 5]
    assert any("taking it over" in line for line in logs), logs
    record = json.loads((tmp_path / "run" / "tracking.json").read_text())
    assert record["folder_id"] == tracker.folder_id and record["run_id"] == tracker.run_id


# ---------------------------------------------------------------------------- names, data
@pytest.mark.parametrize(
    "name", ["../../../escape", "/abs/path", "a/b/.", "a/../b", "a//b", "..", "a\\b", ""]
)
def test_study_names_that_would_leave_alcot_home_are_refused(name, tmp_path, capsys):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(
        f"study: {json.dumps(name)}\nbase: {ROOT / 'configs/train_adaptive.yaml'}\n"
        "grid: {seed: [0]}\n"
    )
    with home_at(tmp_path / "home"):
        assert main(["sweep", "run", str(sweep), "--dry-run"]) == 2
        assert (
            main(["train", "configs/train_adaptive.yaml", "--set", f"tracking.experiment={name}"])
            == 2
        )
    err = capsys.readouterr().err
    assert "study" in err and "tracking.experiment" in err
    assert not (tmp_path / "home").exists() or not any((tmp_path / "home").rglob("config.yaml"))


def test_nested_study_names_stay_under_alcot_home(tmp_path):
    from alcot.orchestrator.config import load_run_config, run_dir

    cfg = load_run_config(None, ["tracking.experiment=team/ablation 1"])
    folder = run_dir(cfg, tmp_path)
    assert folder.is_relative_to(tmp_path / "runs" / "team" / "ablation 1")


def test_sqlite_uri_keeps_artifacts_beside_the_store(tmp_path):
    from alcot.orchestrator.tracking.stores import resolve_uri

    uri, root = resolve_uri(f"sqlite:///{tmp_path / 'db' / 'x.db'}", tmp_path / "home")
    assert root == (tmp_path / "db" / "mlartifacts").as_uri()
    _, root = resolve_uri("postgresql://u@127.0.0.1/db", tmp_path / "home")
    assert root == (tmp_path / "home" / "mlartifacts").as_uri()
    assert resolve_uri("http://127.0.0.1:5000", tmp_path)[1] is None


def write_latin1(path: Path) -> Path:
    path.write_bytes("Caf\xe9 cr\xe8me br\xfbl\xe9e.\n\nNa\xefve r\xe9sum\xe9.\n".encode("latin-1"))
    return path


def bad_input(case: str, d: Path) -> Path:
    """The input file (or folder) of one bad-data case."""
    if case == "binary":
        return Path("/bin/ls")
    if case == "latin1":
        return write_latin1(d / "latin1.txt")
    if case == "empty dir":
        (d / "empty_dir").mkdir()
        return d / "empty_dir"
    text = {"empty": "", "one file": "word " * 500, "three words": "one\n\ntwo\n\nthree\n"}
    path = d / f"{case.replace(' ', '_')}.txt"
    path.write_text(text[case])
    return path


BAD_DATA = {  # case -> (split_paragraphs, what the message says)
    "empty": (False, "0 documents"),
    "binary": (True, "looks binary"),
    "latin1": (True, "not valid utf-8"),
    "one file": (False, "split_paragraphs"),
    "three words": (True, "data.seq_len"),
    "empty dir": (False, "no .txt files"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_refused_before_any_mlflow_run(case, tmp_path, capsys):
    path = bad_input(case, tmp_path)
    split, message = BAD_DATA[case]
    with home_at(tmp_path / "home") as home:
        args = ["--set", "data.source=text", "--set", f"data.path={path}"]
        args += ["--set", f"data.split_paragraphs={str(split).lower()}"]
        code = main(["train", "configs/train_adaptive.yaml", *SETS, *args])
        err = capsys.readouterr().err
        assert code == 2, err
        assert message in err and str(path) in err, err
        assert experiment_runs(f"sqlite:///{home / 'mlflow.db'}") == []  # no FAILED run left


def test_latin1_trains_with_an_explicit_encoding(tmp_path):
    from alcot.data.config import DataConfig
    from alcot.data.sources import iter_documents

    path = write_latin1(tmp_path / "latin1.txt")
    cfg = DataConfig(source="text", path=str(path), split_paragraphs=True, encoding="latin-1")
    assert list(iter_documents(cfg)) == ["Café crème brûlée.", "Naïve résumé."]
    with pytest.raises(ConfigError, match="data.encoding"):
        DataConfig(encoding="no-such-codec")


def test_resume_never_starts_a_new_record(tmp_path):
    """`train.resume: never` trains the folder again as a new MLflow run; the earlier records
    are set aside, not mixed into (or deduplicated against) the new ones."""
    with home_at(tmp_path / "home") as home:
        logs: list[str] = []
        run_dir = tmp_path / "run"
        first = run_training_quiet(small_run(run_dir, "train.steps=10"), logs)
        again = run_training_quiet(small_run(run_dir, "train.steps=10", "train.resume=never"), logs)
        uri = f"sqlite:///{home / 'mlflow.db'}"
    assert again.run_id != first.run_id
    for out in (first, again):
        assert steps_of(uri, out.run_id, "train/loss") == list(range(1, 11))
    assert [row["step"] for row in read_journal(run_dir)] == list(range(1, 11))
    assert len(list((run_dir / "previous").glob("*/metrics.jsonl"))) == 1


def test_a_driver_whose_store_goes_away_before_its_parent_run_says_so(tmp_path, monkeypatch):
    """The store answered the plan, then went away (a restart) before the parent run was
    opened: the driver retries for ALCOT_TRACKING_PATIENCE, then a ConfigError naming the
    store (exit code 2 from the CLI), not a traceback."""
    from conftest import free_port

    from alcot.orchestrator.sweeps.parent_runs import open_parent
    from alcot.orchestrator.sweeps.spec import load_sweep

    sweep_path = tmp_path / "s.yaml"
    dead = f"http://127.0.0.1:{free_port()}"
    sweep_path.write_text(
        f"study: away\nbase: {ROOT / 'configs/train_adaptive.yaml'}\ngrid: {{seed: [0]}}\n"
        f"tracking_uri: {dead}\n"
    )
    monkeypatch.setenv("ALCOT_TRACKING_PATIENCE", "1")
    logs: list[str] = []
    with pytest.raises(ConfigError, match="cannot reach the tracking store"):
        open_parent(load_sweep(sweep_path), tmp_path / "home", "sweep", logs.append)
    assert any("could not open the sweep's parent run" in line for line in logs), logs
