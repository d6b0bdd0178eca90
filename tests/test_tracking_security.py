"""The team tracking server's access control, for real: PostgreSQL and ``infra/mlflow/serve.sh``
with basic-auth, the way docs/cluster.md sets it up. A request without credentials and a user
without permission on an experiment can neither read nor write its runs, through any of the
server's doors (REST, the UI's ajax paths, GraphQL, the artifact proxy); the owner can (so the
refusals are not a broken server). Credentials stay out of what alcot records: a tracking URI
with a password in it is refused before anything is recorded; the server's own password is
not in the process list.

The sweep test in ``test_infra_mlflow.py`` checks the rest on a real sweep: no credential in its
logs, run folders, run params and tags, the sweep's recorded copy, or the server's log."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from services import auth_server_env, mlflow_server, postgres

BIN = Path(sys.executable).parent
ADMIN_PW = "admin-pw-security-0123"
DB_PW = "db-pw-security-4567"
ALICE = ("alice", "alice-pw-0123456789")
BOB = ("bob", "bob-pw-0123456789")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the module: default permission NO_PERMISSIONS (a user sees only what he
    created or was granted)."""
    tmp = tmp_path_factory.mktemp("authserver")
    artifacts = tmp / "artifacts"
    artifacts.mkdir()
    with postgres() as pg:
        pg.create_databases(DB_PW)
        env = auth_server_env(
            pg,
            artifacts,
            DB_PW,
            ADMIN_PW,
            "security-test-key-0123456789abcdef",
            MLFLOW_AUTH_DEFAULT_PERMISSION="NO_PERMISSIONS",
            ALCOT_MLFLOW_AUTH_CACHE_SECONDS="60",
        )
        with mlflow_server(env, tmp / "mlflow.log") as srv:
            admin = ("admin", ADMIN_PW)
            for user, pw in (ALICE, BOB):
                res = _call(srv, "POST", "/api/2.0/mlflow/users/create", admin,
                            json={"username": user, "password": pw})  # fmt: skip
                assert res.status_code == 200, res.text
            srv.artifacts = artifacts
            yield srv


def _call(server, method: str, path: str, auth, **kw) -> requests.Response:
    return requests.request(method, server.url + path, auth=auth, timeout=30, **kw)


def _private_run(server, owner, name: str) -> dict:
    """An experiment ``owner`` creates (so only he may use it), with a run holding a metric,
    a param, a tag and an artifact (uploaded through the server's proxy)."""
    exp = _call(server, "POST", "/api/2.0/mlflow/experiments/create", owner, json={"name": name})
    assert exp.status_code == 200, exp.text
    exp_id = exp.json()["experiment_id"]
    run = _call(server, "POST", "/api/2.0/mlflow/runs/create", owner,
                json={"experiment_id": exp_id, "run_name": "secret-run"})  # fmt: skip
    assert run.status_code == 200, run.text
    info = run.json()["run"]["info"]
    rid = info["run_id"]
    batch = {
        "run_id": rid,
        "metrics": [{"key": "val/ppl", "value": 42.5, "timestamp": 1, "step": 1}],
        "params": [{"key": "model.size", "value": "nano"}],
        "tags": [{"key": "note", "value": "private"}],
    }
    assert _call(server, "POST", "/api/2.0/mlflow/runs/log-batch", owner, json=batch).ok
    art = _artifact_path(info["artifact_uri"], "result.txt")
    up = _call(server, "PUT", art, owner, data=b"private result")
    assert up.status_code == 200, up.text
    return {"exp": exp_id, "run": rid, "artifact_uri": info["artifact_uri"]}


def _artifact_path(artifact_uri: str, name: str) -> str:
    assert artifact_uri.startswith("mlflow-artifacts:/"), artifact_uri
    return "/api/2.0/mlflow-artifacts/artifacts/" + artifact_uri.split(":/", 1)[1] + "/" + name


def _reads(t: dict) -> list[tuple[str, str, dict]]:
    rid, exp = t["run"], t["exp"]
    gql = (
        f'query {{ mlflowGetRun(input: {{runId: "{rid}"}}) {{ run {{ info {{ runId status }} '
        "data { metrics { key value } params { key value } } } } }"
    )
    return [
        ("GET", f"/api/2.0/mlflow/experiments/get?experiment_id={exp}", {}),
        ("GET", f"/api/2.0/mlflow/runs/get?run_id={rid}", {}),
        ("GET", f"/ajax-api/2.0/mlflow/runs/get?run_id={rid}", {}),
        ("POST", "/api/2.0/mlflow/runs/search", {"json": {"experiment_ids": [exp]}}),
        ("POST", "/ajax-api/2.0/mlflow/runs/search", {"json": {"experiment_ids": [exp]}}),
        ("GET", f"/api/2.0/mlflow/metrics/get-history?run_id={rid}&metric_key=val/ppl", {}),
        (
            "GET",
            "/ajax-api/2.0/mlflow/metrics/get-history-bulk-interval"
            f"?run_ids={rid}&metric_key=val/ppl&max_results=10",
            {},
        ),  # fmt: skip
        ("GET", f"/api/2.0/mlflow/artifacts/list?run_id={rid}", {}),
        ("GET", _artifact_path(t["artifact_uri"], "result.txt"), {}),
        ("GET", f"/get-artifact?path=result.txt&run_uuid={rid}", {}),
        ("POST", "/graphql", {"json": {"query": gql}}),
    ]


def _writes(t: dict) -> list[tuple[str, str, dict]]:
    rid, exp = t["run"], t["exp"]
    point = {"key": "val/ppl", "value": 1.0, "timestamp": 2, "step": 2}
    return [
        ("POST", "/api/2.0/mlflow/runs/log-batch", {"json": {"run_id": rid, "metrics": [point]}}),
        ("POST", "/api/2.0/mlflow/runs/log-metric", {"json": {"run_id": rid, **point}}),
        (
            "POST",
            "/api/2.0/mlflow/runs/set-tag",
            {"json": {"run_id": rid, "key": "note", "value": "tampered"}},
        ),  # fmt: skip
        (
            "POST",
            "/api/2.0/mlflow/runs/log-parameter",
            {"json": {"run_id": rid, "key": "extra", "value": "x"}},
        ),  # fmt: skip
        ("POST", "/api/2.0/mlflow/runs/update", {"json": {"run_id": rid, "status": "KILLED"}}),
        ("POST", "/api/2.0/mlflow/runs/delete", {"json": {"run_id": rid}}),
        ("POST", "/api/2.0/mlflow/runs/create", {"json": {"experiment_id": exp}}),
        ("PUT", _artifact_path(t["artifact_uri"], "evil.txt"), {"data": b"tampered"}),
        ("POST", "/api/2.0/mlflow/experiments/delete", {"json": {"experiment_id": exp}}),
    ]


def _leaks(res: requests.Response, t: dict) -> bool:
    """Does the answer carry anything of the private run?"""
    body = res.content
    return any(s in body for s in (b"42.5", b"private result", b"nano", b"secret-run"))


def _unchanged(server, t: dict) -> None:
    """The owner's view of the run after the refused writes: exactly what he logged."""
    admin = ("admin", ADMIN_PW)
    run = _call(server, "GET", f"/api/2.0/mlflow/runs/get?run_id={t['run']}", admin).json()["run"]
    assert run["info"]["status"] == "RUNNING" and run["info"]["lifecycle_stage"] == "active"
    assert run["data"]["tags"] and {"key": "note", "value": "private"} in run["data"]["tags"]
    assert [p["key"] for p in run["data"]["params"]] == ["model.size"]
    hist = _call(
        server, "GET", f"/api/2.0/mlflow/metrics/get-history?run_id={t['run']}&metric_key=val/ppl",
        admin,
    ).json()["metrics"]  # fmt: skip
    assert [(m["step"], m["value"]) for m in hist] == [(1, 42.5)]
    runs = _call(server, "POST", "/api/2.0/mlflow/runs/search", admin,
                 json={"experiment_ids": [t["exp"]]}).json()["runs"]  # fmt: skip
    assert len(runs) == 1
    files = _call(server, "GET", f"/api/2.0/mlflow/artifacts/list?run_id={t['run']}", admin)
    assert [f["path"] for f in files.json()["files"]] == ["result.txt"]


def _refused(server, auth, calls, t, codes, filtered: bool = False) -> list[str]:
    """The calls that were not refused (status not in ``codes``) or whose answer leaked. With
    ``filtered``, an answer from which the run was left out also counts as refused (a search
    answers a user what he may see; GraphQL answers ``null`` for what he may not)."""
    bad = []
    for method, path, kw in calls:
        res = _call(server, method, path, auth, **kw)
        ok = res.status_code in codes or (filtered and res.status_code == 200)
        if not ok or _leaks(res, t):
            bad.append(f"{method} {path}: {res.status_code} {res.text[:200]}")
    return bad


@pytest.mark.slow
def test_without_credentials_nothing_is_read_or_written(server):
    t = _private_run(server, ALICE, "sec-anonymous")
    for auth in (None, ("alice", "wrong-password"), ("nobody", "x")):
        bad = _refused(server, auth, _reads(t) + _writes(t), t, {401})
        assert not bad, (auth, bad)
    _unchanged(server, t)


@pytest.mark.slow
def test_a_user_without_permission_can_neither_read_nor_write(server):
    t = _private_run(server, ALICE, "sec-private")
    # bob has no permission on alice's experiment (the server's default: NO_PERMISSIONS)
    bad = _refused(server, BOB, _reads(t), t, {403}, filtered=True)
    bad += _refused(server, BOB, _writes(t), t, {403})
    assert not bad, bad
    # nor does a search across experiments hand him alice's runs
    res = _call(server, "POST", "/api/2.0/mlflow/runs/search", BOB,
                json={"experiment_ids": [t["exp"], "0"]})  # fmt: skip
    assert res.status_code == 403 or not _leaks(res, t), res.text[:300]
    _unchanged(server, t)

    # granted READ, he reads it, and still cannot write
    grant = {"username": "bob", "resource_type": "experiment", "resource_id": t["exp"]}
    res = _call(server, "POST", "/api/3.0/mlflow/users/permissions/grant", ALICE,
                json={**grant, "permission": "READ"})  # fmt: skip
    assert res.status_code == 200, res.text
    res = _call(server, "GET", f"/api/2.0/mlflow/runs/get?run_id={t['run']}", BOB)
    assert res.status_code == 200 and b"42.5" in res.content, res.text[:300]
    got = _call(server, "GET", _artifact_path(t["artifact_uri"], "result.txt"), BOB)
    assert got.status_code == 200 and got.content == b"private result"
    bad = _refused(server, BOB, _writes(t), t, {403})
    assert not bad, bad
    _unchanged(server, t)

    # the owner may write (the refusals above are the permission check, not a broken server)
    point = {"key": "val/ppl", "value": 40.0, "timestamp": 3, "step": 3}
    res = _call(server, "POST", "/api/2.0/mlflow/runs/log-batch", ALICE,
                json={"run_id": t["run"], "metrics": [point]})  # fmt: skip
    assert res.status_code == 200, res.text


@pytest.mark.slow
def test_the_database_password_is_not_in_the_process_list(server):
    import psutil

    root = psutil.Process(server.proc.pid)
    procs = [root, *root.children(recursive=True)]
    assert len(procs) >= 2  # serve.sh's mlflow server and its uvicorn worker(s)
    for p in procs:
        cmdline = " ".join(p.cmdline())
        assert DB_PW not in cmdline and ADMIN_PW not in cmdline, cmdline
    log = server.log.read_text()
    assert DB_PW not in log and ADMIN_PW not in log


def test_a_tracking_uri_with_a_password_is_refused_before_anything_is_recorded(tmp_path):
    """``https://user:pw@host`` would be recorded with every run (params, ``tracking.json``, the
    Ray job's environment): refused, with the variables to use instead, nothing written."""
    home = tmp_path / "home"
    secret = "pw-in-uri-0123"
    env = dict(os.environ, ALCOT_HOME=str(home))
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [str(BIN / "alcot"), "train", "configs/train_adaptive.yaml", "--set", "train.steps=1"]
    root = Path(__file__).resolve().parents[1]
    for extra, where in (
        ({"MLFLOW_TRACKING_URI": f"http://bob:{secret}@127.0.0.1:9/"}, {}),
        ({}, {"tracking.uri": f"postgresql+psycopg://mlflow:{secret}@127.0.0.1:9/mlflow"}),
    ):
        sets = [a for k, v in where.items() for a in ("--set", f"{k}={v}")]
        res = subprocess.run([*cmd, *sets], cwd=root, env={**env, **extra},
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        field = "MLFLOW_TRACKING_URI" if extra else "tracking.uri"
        assert res.returncode == 2 and f"{field}: holds a password" in res.stderr, res.stderr
        assert "MLFLOW_TRACKING_PASSWORD" in res.stderr
        assert secret not in res.stdout + res.stderr
        assert not home.exists() or not any(home.rglob("*"))
    # a URI with a user name only (the password in the environment) is fine
    from alcot.orchestrator.config import check_uri_credentials

    check_uri_credentials("https://mlflow.example.org:5000", "tracking.uri")
    check_uri_credentials("postgresql+psycopg://mlflow@db/mlflow", "tracking.uri")


_JOB_PROBE = """
import json, sys, time
from ray.job_submission import JobSubmissionClient
address, job_id = sys.argv[1:]
jobs = JobSubmissionClient(address)
deadline = time.time() + 120
while time.time() < deadline and not jobs.get_job_status(job_id).is_terminal():
    time.sleep(2)
if not jobs.get_job_status(job_id).is_terminal():
    jobs.stop_job(job_id)
info = jobs.get_job_info(job_id)
print(json.dumps({"info": {"entrypoint": info.entrypoint, "runtime_env": info.runtime_env,
                           "metadata": info.metadata}, "logs": jobs.get_job_logs(job_id)},
                 default=str))
"""


@pytest.mark.slow
def test_a_submitted_sweep_ships_no_credentials_to_the_ray_job(tmp_path):
    """``alcot sweep submit`` from a shell holding the tracking credentials: the Ray job's
    recorded metadata (entrypoint, runtime env, metadata) and its logs do not hold them. A real
    single-node Ray cluster (head with the job server), stopped by its own process group."""
    import tempfile

    from services import free_port, stop_session, wait_for

    secret = "tracking-pw-in-the-shell-0123"
    work = tmp_path / "work"
    work.mkdir()
    (work / "sweep.yaml").write_text(
        "study: shipped\ngrid:\n  model.method: [vanilla]\nbudget: {tokens: 1024}\n"
    )
    port, dash = free_port(), free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # unix socket paths must stay short
    env = dict(os.environ, ALCOT_HOME=str(tmp_path / "home"), RAY_AUTH_MODE="token",
               PATH=f"{BIN}:{os.environ['PATH']}")  # fmt: skip
    env.pop("MLFLOW_TRACKING_PASSWORD", None)
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         "--include-dashboard=true", "--num-cpus=1", f"--temp-dir={temp}",
         # the job agent on a port of its own (Ray's default, 52365, may be another Ray's)
         f"--dashboard-agent-listen-port={free_port()}",
         "--disable-usage-stats"],
        env=env, stdout=open(tmp_path / "ray.log", "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
        start_new_session=True,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dash}"

    def up() -> bool:  # the job server answers (token auth may refuse an anonymous request)
        try:
            return requests.get(address + "/api/version", timeout=2).status_code in (200, 401)
        except OSError:
            return False

    try:
        wait_for(up, 240, "ray head", head, tmp_path / "ray.log")
        shell = dict(env, MLFLOW_TRACKING_URI="http://127.0.0.1:9",
                     MLFLOW_TRACKING_USERNAME="alice", MLFLOW_TRACKING_PASSWORD=secret)  # fmt: skip
        sub = subprocess.run(
            [str(BIN / "alcot"), "sweep", "submit", "sweep.yaml", "--address", address],
            cwd=work, env=shell, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert sub.returncode == 0, sub.stdout + sub.stderr
        job_id = sub.stdout.split("submitted job ")[1].split()[0]
        # the job as Ray recorded it, read by a client in the cluster's (token) environment
        probe = subprocess.run(
            [sys.executable, "-c", _JOB_PROBE, address, job_id],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert probe.returncode == 0, probe.stdout[-2000:] + probe.stderr[-3000:]
        job = json.loads(probe.stdout.strip().splitlines()[-1])
        recorded = json.dumps(job["info"])
        assert "MLFLOW_TRACKING_URI" in recorded  # what is shipped is recorded here
        assert secret not in recorded and "MLFLOW_TRACKING_PASSWORD" not in recorded, recorded
        assert secret not in job["logs"]  # (empty if the job was stopped before it printed)
    finally:
        # every process of the head's session (SIGTERM makes `ray start --block` wait ~30 s)
        stop_session(head.pid)
        head.wait(10)
        shutil.rmtree(temp, ignore_errors=True)


def test_the_secret_search_finds_what_it_looks_for(tmp_path):
    """The search the sweep test runs over everything a sweep wrote: plain text and base64 (of
    ``user:password``, a basic-auth header kept somewhere) both count, clean files do not."""
    import base64

    from services import find_secrets

    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "plain.json").write_text('{"uri": "http://u:s3cret-pw@h"}')
    header = base64.b64encode(b"alice:s3cret-pw").decode()
    (tmp_path / "a" / "hdr.log").write_text(f"Authorization: Basic {header}")
    (tmp_path / "a" / "clean.txt").write_text("nothing here")
    found = sorted(Path(p).name for p in find_secrets([tmp_path], ["s3cret-pw", "alice:s3cret-pw"]))
    assert found == ["hdr.log", "plain.json"]
