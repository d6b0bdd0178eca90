"""The team tracking server of ``infra/mlflow/``, for real: PostgreSQL, ``serve.sh`` with
proxied artifacts and basic-auth, a sweep logging to it over HTTP, the server restarted while the
trials train, and ``alcot analyze`` reading everything back."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import requests
from services import (
    ROOT,
    auth_server_env,
    find_secrets,
    mlflow_server,
    postgres,
    run_record_secrets,
    stop_session,
)

BIN = Path(sys.executable).parent
ADMIN_PW = "admin-pw-for-tests-0123"
SERVE = ROOT / "infra/mlflow/serve.sh"


def serve(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SERVE)], env=env, capture_output=True, text=True, timeout=60)


def test_serve_sh_refuses_an_incomplete_configuration(tmp_path):
    base = {"PATH": os.environ["PATH"], "MLFLOW_BIN": "/bin/false"}
    res = serve(base)
    assert res.returncode == 2 and "MLFLOW_BACKEND_STORE_URI" in res.stderr
    res = serve(dict(base, MLFLOW_BACKEND_STORE_URI="postgresql+psycopg://u:p@h/db"))
    assert res.returncode == 2 and "MLFLOW_ARTIFACTS_DESTINATION" in res.stderr
    ok = dict(
        base,
        MLFLOW_BACKEND_STORE_URI="postgresql+psycopg://u:p@h/db",
        MLFLOW_ARTIFACTS_DESTINATION=tmp_path.as_uri(),
    )
    res = serve(dict(ok, MLFLOW_BACKEND_STORE_URI="/some/folder"))
    assert res.returncode == 2 and "must be a database URI" in res.stderr
    res = serve(dict(ok, ALCOT_MLFLOW_AUTH="1"))
    assert res.returncode == 2 and "MLFLOW_AUTH_DATABASE_URI" in res.stderr
    res = serve(dict(ok, ALCOT_MLFLOW_AUTH="1", MLFLOW_AUTH_DATABASE_URI="postgresql://x/y"))
    assert res.returncode == 2 and "MLFLOW_AUTH_ADMIN_PASSWORD" in res.stderr
    # a complete configuration reaches mlflow (here /bin/false, which fails with 1)
    assert serve(ok).returncode == 1


SWEEP = """
study: pgserver
base:
  seed: 0
  model: {size: micro, method: adaptive, l_max: 2}
  data: {builtin_documents: 600, vocab_size: 512, seq_len: 32}
  train: {batch_size: 8, lr: 0.01, eval_every: 100, eval_batches: 2, checkpoint_every: 100}
  tracking: {flush_seconds: 0.5}
grid:
  model.method: [adaptive, vanilla]
budget: {tokens: 102400}
resources: {cpus: 1}
max_concurrent: 2
retries: 1
"""


def _children(client, study):
    exp = client.get_experiment_by_name(study)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id])
    return [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def _points(client, run_id: str, key: str) -> int:
    return len(client.get_metric_history(run_id, key))


@pytest.mark.slow
def test_sweep_on_postgres_server_survives_a_restart_and_reads_back(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    home = tmp_path / "home"
    figures: dict = {}
    with postgres() as pg:
        pg.create_databases("mlflow-db-pw")
        env = auth_server_env(
            pg,
            artifacts,
            "mlflow-db-pw",
            ADMIN_PW,
            "test-secret-key-0123456789abcdef",
            ALCOT_MLFLOW_AUTH_CACHE_SECONDS="60",
        )
        with mlflow_server(env, tmp_path / "mlflow.log") as server:
            # no credentials, wrong credentials: refused; the admin's: served
            api = server.url + "/api/2.0/mlflow/experiments/search?max_results=5"
            assert requests.get(api, timeout=10).status_code == 401
            assert requests.get(api, auth=("admin", "wrong"), timeout=10).status_code == 401
            assert requests.get(api, auth=("admin", ADMIN_PW), timeout=10).status_code == 200

            client_env = dict(
                os.environ,
                ALCOT_HOME=str(home),
                MLFLOW_TRACKING_URI=server.url,
                MLFLOW_TRACKING_USERNAME="admin",
                MLFLOW_TRACKING_PASSWORD=ADMIN_PW,
            )
            monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")  # this process's client
            monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PW)
            client = MlflowClient(server.url)
            sweep = tmp_path / "sweep.yaml"
            sweep.write_text(textwrap.dedent(SWEEP))
            log = open(tmp_path / "sweep.log", "w")  # noqa: SIM115 (closed below)
            driver = subprocess.Popen(
                [str(BIN / "alcot"), "sweep", "run", str(sweep)],
                cwd=ROOT,
                env=client_env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                # both trials training (seen in their journals, not by asking the busy server):
                # then the server goes away and comes back while they go on
                runs_dir = home / "runs" / "pgserver"
                deadline = time.time() + 300
                while time.time() < deadline:
                    journals = list(runs_dir.glob("*/metrics.jsonl"))
                    if len(journals) == 2 and all(
                        len(j.read_text().splitlines()) >= 3 for j in journals
                    ):
                        break
                    assert driver.poll() is None, (tmp_path / "sweep.log").read_text()[-3000:]
                    time.sleep(0.5)
                else:
                    pytest.fail("the trials did not start training in time")
                kids = _children(client, "pgserver")
                at_stop = {
                    r.info.run_id: _points(client, r.info.run_id, "train/loss") for r in kids
                }
                assert all(r.info.status == "RUNNING" for r in _children(client, "pgserver"))
                t0 = time.time()
                server.stop()
                time.sleep(3)
                server.start()
                figures["outage_seconds"] = round(time.time() - t0, 1)
                figures["running_at_stop"] = len(at_stop)
                assert driver.wait(timeout=420) == 0, (tmp_path / "sweep.log").read_text()[-4000:]
            finally:
                if driver.poll() is None:  # its embedded Ray does not die with it: stop the
                    os.killpg(driver.pid, 9)  # driver's session (not every Ray on the machine)
                    driver.wait()
                    stop_session(driver.pid)
                log.close()

            # artifacts a trial could not upload while the server was away are kept in its
            # folder; the documented recovery sends them (metrics need none: see below)
            for folder in (home / "runs" / "pgserver").iterdir():
                sync = subprocess.run(
                    [str(BIN / "alcot"), "tracking", "sync", str(folder)],
                    env=client_env, capture_output=True, text=True, timeout=300,
                )  # fmt: skip
                assert sync.returncode == 0, sync.stdout + sync.stderr
                assert not (folder / "pending_artifacts.json").exists()
            # nothing lost: every (metric, step) journalled by a trial is in MLflow, same value
            kids = _children(client, "pgserver")
            assert sorted(r.data.tags["method"] for r in kids) == ["adaptive", "vanilla"]
            figures["runs"] = []
            for r in kids:
                assert r.info.status == "FINISHED"
                out_dir = Path(r.data.tags["alcot.out_dir"])
                journal = [
                    json.loads(line)
                    for line in (out_dir / "metrics.jsonl").read_text().splitlines()
                ]
                expected = {
                    (k, row["step"]): v for row in journal for k, v in row["metrics"].items()
                }
                found = {}
                for key in {k for k, _ in expected}:
                    for m in client.get_metric_history(r.info.run_id, key):
                        found[(key, m.step)] = m.value
                missing = set(expected) - set(found)
                assert not missing, sorted(missing)[:10]
                assert all(abs(found[k] - v) <= 1e-6 * max(1, abs(v)) for k, v in expected.items())
                assert _points(client, r.info.run_id, "train/loss") > at_stop[r.info.run_id]
                figures["runs"].append(
                    {
                        "run": r.info.run_name,
                        "points_in_mlflow_at_stop": at_stop[r.info.run_id],
                        "expected": len(expected),
                        "found": len(set(expected) & set(found)),
                        "train_steps": max(s for k, s in expected if k == "train/loss"),
                    }
                )
                # artifacts went through the server's proxy into its destination
                assert r.info.artifact_uri.startswith("mlflow-artifacts:")
                names = {a.path for a in client.list_artifacts(r.info.run_id)}
                assert {"config.yaml", "depth_histogram.png"} <= names
                model_uri = r.data.tags.get("alcot.model_uri", "")
                assert model_uri.startswith("models:/"), r.data.tags.get("alcot.model_error")
            assert list(artifacts.rglob("config.yaml")) and list(artifacts.rglob("MLmodel"))

            # the analysis reads it all back through the server, and needs the credentials
            out = tmp_path / "report"
            args = [str(BIN / "alcot"), "analyze", "--experiment", "pgserver", "--out", str(out)]
            no_auth = {k: v for k, v in client_env.items() if not k.startswith("MLFLOW_TRACKING_")}
            refused = subprocess.run(
                [*args, "--tracking-uri", server.url, "--bootstrap", "0"],
                env=no_auth,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert refused.returncode != 0
            res = subprocess.run(
                [*args, "--bootstrap", "0"],
                env=client_env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert res.returncode == 0, res.stdout + res.stderr
            report = (out / "report.md").read_text()
            assert "adaptive" in report and "vanilla" in report
            parents = [
                r
                for r in client.search_runs(
                    [client.get_experiment_by_name("pgserver").experiment_id]
                )
                if r.data.tags.get("alcot.kind") == "sweep"
            ]
            logged = {a.path for a in client.list_artifacts(parents[0].info.run_id, "analysis")}
            assert "analysis/report.html" in logged

            # no credential in what the sweep recorded: its log, the run folders (journals,
            # tracking.json, trial logs, Ray's results), the server's artifacts (the sweep's
            # recorded copy, configs, models), the runs' params and tags, the server's log
            secrets = [ADMIN_PW, "mlflow-db-pw", f"admin:{ADMIN_PW}"]
            copies = [a.path for a in client.list_artifacts(parents[0].info.run_id)]
            assert "sweep.yaml" in copies  # the recorded copy is among what is searched
            written = [tmp_path / "sweep.log", home, artifacts, out, tmp_path / "mlflow.log"]
            assert not find_secrets(written, secrets), find_secrets(written, secrets)
            assert not run_record_secrets(client, "pgserver", secrets)
    figures_path = Path(os.environ.get("ALCOT_TEST_ARTIFACTS", tmp_path)) / "server_restart.json"
    figures_path.parent.mkdir(parents=True, exist_ok=True)
    figures_path.write_text(json.dumps(figures, indent=1))
    print(json.dumps(figures, indent=1))


@pytest.mark.slow
def test_load_bench_smoke():
    """bench/tracking_load.py end to end at a tiny size: its own PostgreSQL and auth server,
    two simulated trials for a few seconds; the last line has exactly the issue's keys."""
    res = subprocess.run(
        [sys.executable, str(ROOT / "bench/tracking_load.py"), "--trials", "2", "--seconds", "4",
         "--flush", "1", "--procs", "1", "--drain", "60"],
        capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    last = json.loads(lines[-1])
    assert list(last) == ["trials", "points_per_s", "p99_delivery_lag_s", "lost", "server_cpu_s"]
    assert last["trials"] == 2 and last["lost"] == 0 and last["points_per_s"] > 0
    assert 0 < last["p99_delivery_lag_s"] < 60 and last["server_cpu_s"] > 0
    table = json.loads(lines[-2])["table"]
    assert table[0]["journalled"] > 0 and table[0]["duplicates"] == 0
    bad = subprocess.run(
        [sys.executable, str(ROOT / "bench/tracking_load.py"), "--trials", "2,x"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2 and "--trials" in bad.stderr
