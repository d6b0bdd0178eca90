"""Sweeps on real Ray: a driver killed mid-sweep, a real two-process cluster reached through the
Jobs API, then (in this process, on an embedded Ray) an end-to-end sweep with a failing trial,
resubmission, and an Optuna search. Every command that starts a Ray runs in a session of its own,
and the test stops what is left of those sessions (not `ray stop --force`, which would stop
every Ray on the machine: another test's, or a sweep running beside the tests)."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from conftest import home_at
from services import run_in_session, stop_session

from alcot.orchestrator.cli import main

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

BASE = """
base:
  seed: 0
  model: {size: micro, method: adaptive, l_max: 2}
  data: {builtin_documents: 600, vocab_size: 512, seq_len: 32}
  train: {batch_size: 8, lr: 0.01, eval_every: 1000, eval_batches: 2, checkpoint_every: 4}
  tracking: {flush_seconds: 0.2}
resources: {cpus: 1}
max_concurrent: 2
"""


def sweep_file(folder: Path, body: str, name: str = "sweep.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(BASE) + textwrap.dedent(body))
    return path


def runs(home: Path, study: str):
    return runs_at(f"sqlite:///{home / 'mlflow.db'}", study)  # open_client: creation locked


def children(home, study, status=None):
    return [
        r
        for r in runs(home, study)
        if "mlflow.parentRunId" in r.data.tags and (status is None or r.info.status == status)
    ]


@pytest.fixture
def sessions():
    """Ids of the sessions the test's commands ran in; what is left of them is stopped after
    the test (an embedded Ray dies with its driver only when the driver shuts it down)."""
    started: list[int] = []
    yield started
    ray_stop(started)


def ray_stop(sessions: list[int]) -> None:
    for sid in sessions:
        stop_session(sid)


def alcot(*args, sessions: list[int], env=None, cwd=ROOT, timeout=600):
    return run_in_session([str(BIN / "alcot"), *args], sessions, cwd=cwd, env=env, timeout=timeout)


@pytest.mark.slow
def test_killed_driver_resubmitted_finishes_only_the_rest(tmp_path, sessions):
    home = tmp_path / "home"
    env = dict(os.environ, ALCOT_HOME=str(home))
    path = sweep_file(
        tmp_path,
        """
        study: killtest
        grid:
          model.halting.lambda: [0.01, 0.03, 0.1, 0.3]
        budget: {tokens: 12288}
        max_concurrent: 1
    """,
    )
    driver = subprocess.Popen(
        [str(BIN / "alcot"), "sweep", "run", str(path)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    sessions.append(driver.pid)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not children(home, "killtest", "FINISHED"):
            assert driver.poll() is None, driver.stdout.read().decode()[-3000:]
            time.sleep(1)
        assert children(home, "killtest", "FINISHED"), "no trial finished in time"
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    finally:
        ray_stop(sessions)  # the driver's embedded Ray does not die with it
    done_before = {r.data.tags["config_hash"] for r in children(home, "killtest", "FINISHED")}
    assert 1 <= len(done_before) < 4

    again = alcot("sweep", "run", str(path), env=env, sessions=sessions)
    ray_stop(sessions)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("skipped (finished before)") == len(done_before)
    finished = children(home, "killtest", "FINISHED")
    hashes = [r.data.tags["config_hash"] for r in finished]
    assert len(hashes) == 4 and len(set(hashes)) == 4  # each trial once, none trained twice
    assert len(children(home, "killtest")) == 4  # the interrupted trial continued its own run
    assert_complete(home, finished)
    # the killed driver's parent run is not left RUNNING forever
    parents = [r for r in runs(home, "killtest") if r.data.tags.get("alcot.kind") == "sweep"]
    assert sorted(r.info.status for r in parents) == ["FINISHED", "KILLED"], parents
    assert "KILLED" in again.stdout


def assert_complete(home: Path, finished, uri: str | None = None) -> None:
    """Every finished trial's MLflow run has each journalled step exactly once (train and val)
    and the artifacts its folder recorded."""
    from alcot.orchestrator.tracking.run_folder import read_journal
    from alcot.orchestrator.tracking.stores import open_client

    client = open_client(uri or f"sqlite:///{home / 'mlflow.db'}")
    for r in finished:
        rows = read_journal(Path(r.data.tags["alcot.out_dir"]))
        for key in ("train/loss", "val/loss"):
            want = sorted({row["step"] for row in rows if key in row["metrics"]})
            got = sorted(m.step for m in client.get_metric_history(r.info.run_id, key))
            assert got == want and want, (key, got, want)  # missing 0, duplicated 0
        names = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"config.yaml", "depth_histogram.png"} <= names, names


@pytest.mark.slow
def test_the_same_sweep_launched_twice_at_once_trains_each_trial_once(tmp_path, sessions):
    """Two drivers of one sweep started 0.5 s apart on a fresh store: the store is created
    once, each trial is trained by one of them, the other waits and follows it."""
    home = tmp_path / "home"
    env = dict(os.environ, ALCOT_HOME=str(home))
    path = sweep_file(
        tmp_path,
        """
        study: twice
        grid:
          model.halting.lambda: [0.01, 0.1]
        budget: {tokens: 8192}
        max_concurrent: 1
    """,
    )
    cmd = [str(BIN / "alcot"), "sweep", "run", str(path)]
    procs = []
    try:
        for _ in range(2):
            procs.append(
                subprocess.Popen(
                    cmd,
                    cwd=ROOT,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
            sessions.append(procs[-1].pid)
            time.sleep(0.5)
        logs = [p.communicate(timeout=600)[0].decode() for p in procs]
    finally:
        ray_stop(sessions)
    assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)[-5000:]
    assert "in use by" in "".join(logs) or "not training again" in "".join(logs), logs
    kids = children(home, "twice")
    hashes = [r.data.tags["config_hash"] for r in kids]
    assert len(hashes) == 2 and len(set(hashes)) == 2  # duplicate runs: 0
    assert all(r.info.status == "FINISHED" for r in kids)
    assert_complete(home, kids)
    for r in kids:  # every step trained once: the journal has no step twice
        from alcot.orchestrator.tracking.run_folder import read_journal

        steps = [row["step"] for row in read_journal(Path(r.data.tags["alcot.out_dir"]))]
        assert len(steps) == len(set(steps)), steps


@pytest.mark.slow
def test_tracking_outage_mid_sweep_loses_nothing(tmp_path, sessions):
    """The tracking server goes down mid-sweep and stays down past the end: trials still
    train (one starts during the outage), the driver ends without a traceback saying what is
    owed, and a resubmission delivers everything from the run folders without training."""
    from conftest import MlflowServer

    server = MlflowServer(tmp_path / "server")
    server.root.mkdir()
    home = tmp_path / "home"
    env = dict(
        os.environ,
        ALCOT_HOME=str(home),
        MLFLOW_TRACKING_URI=server.uri,
        ALCOT_TRACKING_PATIENCE="3",
    )
    path = sweep_file(
        tmp_path,
        """
        study: outage
        grid:
          model.halting.lambda: [0.01, 0.1]
        budget: {tokens: 8192}
        max_concurrent: 1
        retries: 0
    """,
    )
    try:
        server.start()
        driver = subprocess.Popen(
            [str(BIN / "alcot"), "sweep", "run", str(path)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        sessions.append(driver.pid)
        deadline = time.time() + 300
        while time.time() < deadline and not list(home.glob("runs/outage/*/metrics.jsonl")):
            assert driver.poll() is None, driver.stdout.read().decode()[-3000:]
            time.sleep(0.05)
        server.stop()  # down from the first trial's first steps to after the driver ends
        out = driver.communicate(timeout=600)[0].decode()
        ray_stop(sessions)
        assert driver.returncode == 1, out[-4000:]
        assert "Traceback" not in out, out[-4000:]
        assert "not yet in MLflow" in out or "MLflow owed" in out, out[-4000:]
        server.start()
        again = alcot("sweep", "run", str(path), env=env, sessions=sessions)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        assert "delivering 2 trained trials" in again.stdout, again.stdout[-3000:]
        finished = children_at(server.uri, "outage", "FINISHED")
        assert len(finished) == 2 and len(children_at(server.uri, "outage")) == 2
        assert_complete(home, finished, server.uri)
        parents = [
            r for r in runs_at(server.uri, "outage") if r.data.tags.get("alcot.kind") == "sweep"
        ]
        assert sorted(r.info.status for r in parents) == ["FINISHED", "KILLED"]
    finally:
        server.stop()
        ray_stop(sessions)


def runs_at(uri: str, study: str):
    from alcot.orchestrator.tracking.stores import open_client

    client = open_client(uri)
    exp = client.get_experiment_by_name(study)
    return [] if exp is None else client.search_runs([exp.experiment_id])


def children_at(uri: str, study: str, status=None):
    return [
        r
        for r in runs_at(uri, study)
        if "mlflow.parentRunId" in r.data.tags and (status is None or r.info.status == status)
    ]


@pytest.mark.slow
def test_submit_to_a_real_cluster_through_the_jobs_api(tmp_path, sessions):
    home = tmp_path / "home"
    work = tmp_path / "work"
    sweep_file(
        work,
        """
        study: clustertest
        grid:
          model.method: [adaptive, vanilla]
        budget: {tokens: 4096}
    """,
    )
    with socket.socket() as s1, socket.socket() as s2, socket.socket() as s3, socket.socket() as s4:
        for s in (s1, s2, s3, s4):
            s.bind(("127.0.0.1", 0))
        port, dash = s1.getsockname()[1], s2.getsockname()[1]
        # each node's dashboard agent (which runs submitted jobs) on a port of its own: Ray's
        # fixed default (52365) is taken by whichever Ray on this machine started first (another
        # test's, or the other node), and a head whose agent cannot listen answers every
        # submission with "No available agent to submit job"
        agent_head, agent_worker = s3.getsockname()[1], s4.getsockname()[1]
    env = dict(
        os.environ, ALCOT_HOME=str(home), PATH=f"{BIN}:{os.environ['PATH']}", RAY_AUTH_MODE="token"
    )  # Ray 2.59+ clusters require a token by default
    ray = str(BIN / "ray")
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # unix socket paths must stay short
    try:
        head = run_in_session(
            [
                ray,
                "start",
                "--head",
                "--node-ip-address=127.0.0.1",
                f"--port={port}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dash}",
                "--include-dashboard=true",
                f"--dashboard-agent-listen-port={agent_head}",
                "--num-cpus=2",
                f"--temp-dir={temp}",
                "--disable-usage-stats",
            ],
            sessions,
            env=env,
            timeout=180,
        )
        assert head.returncode == 0, head.stdout + head.stderr
        worker = run_in_session(
            [
                ray,
                "start",
                f"--address=127.0.0.1:{port}",
                "--num-cpus=1",
                "--disable-usage-stats",
                f"--dashboard-agent-listen-port={agent_worker}",
            ],
            sessions,
            env=env,
            timeout=180,
        )
        assert worker.returncode == 0, worker.stdout + worker.stderr
        address = f"http://127.0.0.1:{dash}"
        sub = alcot(
            "sweep", "submit", "sweep.yaml", "--address", address, env=env, cwd=work,
            sessions=sessions,
        )  # fmt: skip
        assert sub.returncode == 0, sub.stdout + sub.stderr
        job_id = sub.stdout.split("submitted job ")[1].split()[0]
        # what the submission tells its user to run: the logs, followed until the job ends
        logs = alcot(
            "sweep", "logs", job_id, "--address", address, "--follow", env=env,
            sessions=sessions, timeout=420,
        ).stdout  # fmt: skip
        status = alcot(
            "sweep", "status", job_id, "--address", address, env=env, sessions=sessions
        ).stdout.strip()
        assert status == "SUCCEEDED", logs[-4000:]
        assert "all trials finished" in logs
    finally:
        ray_stop(sessions)
        shutil.rmtree(temp, ignore_errors=True)
    finished = children(home, "clustertest", "FINISHED")
    assert sorted(r.data.tags["method"] for r in finished) == ["adaptive", "vanilla"]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    with home_at(tmp_path_factory.mktemp("sweephome"), shutdown_ray=True) as home:
        yield home


@pytest.mark.slow
def test_sweep_end_to_end_with_a_failing_trial(home, tmp_path, capsys):
    path = sweep_file(
        tmp_path,
        """
        study: e2e
        grid:
          model.method: [adaptive, vanilla]
          model.halting.lambda: [0.01, 0.1]
          data.source: [builtin, jsonl]
        overrides:
          - when: {data.source: jsonl}
            set: {data.path: /nonexistent/corpus.jsonl, model.method: vanilla}
        budget: {tokens: 4096}
        retries: 0
    """,
    )
    assert main(["sweep", "run", str(path)]) == 1  # one trial fails, the others finish
    out = capsys.readouterr().out
    assert "failed" in out and "/nonexistent/corpus.jsonl" in out
    parents = [r for r in runs(home, "e2e") if r.data.tags.get("alcot.kind") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FAILED"
    parent = parents[0].info.run_id
    kids = children(home, "e2e")
    assert {r.data.tags["mlflow.parentRunId"] for r in kids} == {parent}
    ok = [r for r in kids if r.info.status == "FINISHED"]
    assert len(ok) == 3 and len(kids) == 3  # bad data fails before any MLflow run exists
    assert "corpus.jsonl" in parents[0].data.tags["alcot.errors"]  # the parent says why
    for r in ok:
        assert r.data.tags["alcot.sweep_id"] == parents[0].data.tags["alcot.sweep_id"]
        assert "val/ppl" in r.data.metrics
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    names = {a.path for a in client.list_artifacts(parent)}
    assert {"sweep.yaml", "summary.csv"} <= names
    from alcot.analysis.load import load_histories, load_runs

    frame = load_runs("e2e")  # the analysis side reads the same store back
    assert len(frame) == 3 and sorted(frame["status"]) == ["FINISHED"] * 3
    hist = load_histories("e2e", ["train/loss"])
    assert not hist.duplicated(["run_id", "step"]).any() and hist["run_id"].nunique() == 3


@pytest.mark.slow
def test_resubmission_is_a_no_op(home, tmp_path, capsys):
    path = sweep_file(
        tmp_path,
        """
        study: resubmit
        grid:
          model.halting.lambda: [0.01, 0.1]
        budget: {tokens: 4096}
    """,
    )
    assert main(["sweep", "run", str(path)]) == 0
    first = {r.info.run_id for r in children(home, "resubmit")}
    assert len(first) == 2
    capsys.readouterr()
    t = time.time()
    assert main(["sweep", "run", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.count("skipped (finished before)") == 2
    assert {r.info.run_id for r in children(home, "resubmit")} == first
    assert time.time() - t < 30


@pytest.mark.slow
def test_switching_store_brings_the_trials_along(home, tmp_path, capsys, monkeypatch):
    """The same sweep against another store (laptop -> team server): the trials trained before
    are imported from their run folders into the new store, not failed and not retrained."""
    path = sweep_file(
        tmp_path,
        """
        study: resubmit
        grid:
          model.halting.lambda: [0.01, 0.1]
        budget: {tokens: 4096}
    """,
    )
    # trained in this home's own store first (a no-op after test_resubmission_is_a_no_op; the
    # test does not rely on running after it, as a parallel worker may not)
    assert main(["sweep", "run", str(path)]) == 0
    capsys.readouterr()
    other = f"sqlite:///{tmp_path / 'team' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    assert main(["sweep", "run", str(path)]) == 0
    out = capsys.readouterr().out
    assert "delivering 2 trained trials" in out and "was tracked in" in out
    finished = children_at(other, "resubmit", "FINISHED")
    assert len(finished) == 2
    assert_complete(home, finished, other)


@pytest.mark.slow
def test_optuna_search(home, tmp_path, capsys):
    path = sweep_file(
        tmp_path,
        """
        study: searchtest
        search:
          trials: 3
          sampler: tpe
          objectives:
            - {metric: val/ppl, direction: minimize}
            - {metric: flops/realised, direction: minimize}
          space:
            model.halting.lambda: {low: 0.001, high: 1.0, log: true}
        budget: {tokens: 4096}
    """,
    )
    assert main(["sweep", "run", str(path)]) == 0
    out = capsys.readouterr().out
    assert "3 trials" in out and "Pareto front" in out
    kids = children(home, "searchtest", "FINISHED")
    assert len(kids) == 3
    lambdas = {float(r.data.params["model.halting.lambda"]) for r in kids}
    assert len(lambdas) == 3 and all(0.001 <= v <= 1.0 for v in lambdas)
    import optuna

    storage = f"sqlite:///{home / 'optuna' / 'searchtest.db'}"
    studies = optuna.get_all_study_summaries(storage)
    assert len(studies) == 1 and studies[0].n_trials == 3
    assert studies[0].directions == [optuna.study.StudyDirection.MINIMIZE] * 2


@pytest.mark.slow
def test_optuna_grid_search_runs_every_point_once(home, tmp_path, capsys):
    """Two trials at a time ask Optuna's grid sampler concurrently: four trials, four points."""
    path = sweep_file(
        tmp_path,
        """
        study: gridsearch
        search:
          trials: 4
          sampler: grid
          space:
            model.method: {choices: [vanilla, adaptive]}
            train.lr: {choices: [1.0e-3, 3.0e-3]}
        budget: {tokens: 2048}
        max_concurrent: 2
    """,
    )
    assert main(["sweep", "run", str(path)]) == 0
    kids = children(home, "gridsearch", "FINISHED")
    points = sorted((r.data.params["model.method"], float(r.data.params["train.lr"])) for r in kids)
    assert points == [("adaptive", 1e-3), ("adaptive", 3e-3), ("vanilla", 1e-3), ("vanilla", 3e-3)]


@pytest.mark.slow
def test_multi_worker_trial_runs_as_a_gang(home, tmp_path, capsys):
    path = sweep_file(
        tmp_path,
        """
        study: gangtest
        grid:
          model.halting.lambda: [0.01]
        budget: {tokens: 4096}
        resources: {cpus: 0.5, data_parallel: 2}
    """,
    )
    assert main(["sweep", "run", str(path)]) == 0
    kids = children(home, "gangtest", "FINISHED")
    assert len(kids) == 1
    assert kids[0].data.tags["alcot.world_size"] == "2"
    assert "val/ppl" in kids[0].data.metrics
