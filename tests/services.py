"""Real services for the infra tests, started on 127.0.0.1 on free ports and always stopped:
PostgreSQL (Debian's server binaries), the MLflow server through ``infra/mlflow/serve.sh``,
and a single-node Slurm cluster (munged, slurmctld, slurmd).

A missing system package skips the test that needs it with the command that installs it,
except when ``ALCOT_REQUIRE_SERVICES=1`` (``.ci/run`` sets it after installing them): then the
test fails, so CI cannot pass by skipping.
"""

from __future__ import annotations

import base64
import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def require(what: str, found: bool, install: str) -> None:
    if found:
        return
    msg = f"{what} is not installed here (install it with: {install})"
    if os.environ.get("ALCOT_REQUIRE_SERVICES") == "1":
        pytest.fail(msg + "; ALCOT_REQUIRE_SERVICES=1 says it must be", pytrace=False)
    pytest.skip(msg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            tail = Path(log).read_text()[-3000:] if log and Path(log).exists() else ""
            raise RuntimeError(f"{what}: the process exited ({proc.returncode})\n{tail}")
        time.sleep(0.5)
    tail = Path(log).read_text()[-3000:] if log and Path(log).exists() else ""
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s\n{tail}")


def _as_user(user: str | None, cmd: list[str]) -> list[str]:
    return ["runuser", "-u", user, "--", *cmd] if user else cmd


def _stop_group(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM the process group of ``proc`` (started with a new session), then SIGKILL."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def session_pids(sid: int) -> list[int]:
    """The live processes of session ``sid`` (/proc/PID/stat: the 4th field after the name)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        state, _ppid, _pgrp, session = stat.rsplit(")", 1)[1].split()[:4]
        if int(session) == sid and state != "Z":  # a zombie is gone, waiting for its parent
            pids.append(int(entry))
    return pids


def stop_session(sid: int, timeout: float = 30) -> None:
    """SIGKILL what is left of session ``sid``: a command started with ``start_new_session``
    and everything it spawned (an embedded Ray's gcs, raylet and workers keep the session of the
    driver that started them; ``ray start`` daemons that of ``ray start``). Unlike ``ray stop
    --force`` it leaves every other Ray on the machine alone (another test's, a running sweep)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        left = [pid for pid in session_pids(sid) if pid != os.getpid()]
        if not left:
            return
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    raise TimeoutError(f"session {sid} still has processes: {session_pids(sid)}")


def run_in_session(cmd: list[str], sessions: list[int], timeout: float = 600, **kw):
    """``subprocess.run(cmd, capture_output=True, text=True)`` in a session of its own, whose id
    is appended to ``sessions`` (for ``stop_session`` afterwards)."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        **kw,
    )  # fmt: skip
    sessions.append(proc.pid)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_session(proc.pid)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


# ------------------------------------------------------------------------------ PostgreSQL
def postgres_bin() -> Path | None:
    for pattern in ("/usr/lib/postgresql/*/bin/initdb", "/usr/pgsql-*/bin/initdb"):
        found = sorted(glob.glob(pattern))
        if found:
            return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class Postgres:
    """A throw-away PostgreSQL cluster: password (scram) login over TCP on 127.0.0.1, trust
    only on its private unix socket (used to create the role and databases)."""

    def __init__(self):
        self.bin = postgres_bin()
        require("PostgreSQL", self.bin is not None, "apt-get install -y postgresql")
        self.user = "postgres" if os.geteuid() == 0 else None  # initdb refuses to run as root
        self.dir = Path(tempfile.mkdtemp(prefix="alcot-pg-", dir="/tmp"))
        self.port = free_port()
        self.data = self.dir / "data"
        self.started = False

    def _run(self, *cmd: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(
            _as_user(self.user, list(cmd)), capture_output=True, text=True, timeout=120, **kw
        )

    def start(self) -> Postgres:
        if self.user:
            shutil.chown(self.dir, self.user, self.user)
        pwfile = self.dir / "pw"
        pwfile.write_text("superpw\n")
        if self.user:
            shutil.chown(pwfile, self.user, self.user)
        res = self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            f"--pwfile={pwfile}",
        )
        assert res.returncode == 0, res.stdout + res.stderr
        opts = f"-k {self.dir} -p {self.port} -c listen_addresses=127.0.0.1"
        res = self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l",
            str(self.dir / "log"), "-w", "start",
        )  # fmt: skip
        assert res.returncode == 0, res.stdout + res.stderr + self.log()
        self.started = True
        return self

    def log(self) -> str:
        path = self.dir / "log"
        return path.read_text()[-3000:] if path.exists() else ""

    def env(self) -> dict[str, str]:
        """psql settings for the superuser over the private socket."""
        return dict(
            os.environ,
            PGHOST=str(self.dir),
            PGPORT=str(self.port),
            PGUSER="postgres",
            PATH=f"{self.bin}:{os.environ['PATH']}",
        )

    def create_databases(self, password: str) -> None:
        res = subprocess.run(
            ["bash", str(ROOT / "infra/mlflow/create-databases.sh")],
            env=dict(self.env(), MLFLOW_DB_PASSWORD=password),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode == 0, res.stdout + res.stderr

    def uri(self, db: str, user: str = "mlflow", password: str = "") -> str:
        return f"postgresql+psycopg://{user}:{password}@127.0.0.1:{self.port}/{db}"

    def stop(self) -> None:
        if self.started:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
            self.started = False
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def postgres():
    pg = Postgres()
    try:
        yield pg.start()
    finally:
        pg.stop()


# ------------------------------------------------------------------------------ MLflow server
class MlflowServer:
    """``infra/mlflow/serve.sh`` with the given environment, on a free port of 127.0.0.1."""

    def __init__(self, env: dict[str, str], log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = dict(env, MLFLOW_HOST="127.0.0.1", MLFLOW_PORT=str(self.port))
        self.env.setdefault("MLFLOW_WORKERS", "1")
        self.log = log
        self.proc: subprocess.Popen | None = None

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                return resp.status == 200
        except urllib.error.HTTPError as err:
            return err.code == 401  # basic-auth guards /health too: the server is up
        except OSError:
            return False

    def start(self, timeout: float = 180) -> MlflowServer:
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen(
                ["bash", str(ROOT / "infra/mlflow/serve.sh")],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for(self.healthy, timeout, "mlflow server", self.proc, self.log)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            _stop_group(self.proc)
            self.proc = None


def auth_server_env(
    pg: Postgres, artifacts: Path, db_password: str, admin_password: str, secret_key: str, **extra
) -> dict[str, str]:
    """The environment of ``serve.sh`` for a server with basic auth on PostgreSQL: runs in the
    database ``mlflow``, users and permissions in ``mlflow_auth`` (both created with
    ``pg.create_databases(db_password)``), artifacts under ``artifacts``; ``extra`` adds to it."""
    return dict(
        os.environ,
        MLFLOW_BACKEND_STORE_URI=pg.uri("mlflow", password=db_password),
        MLFLOW_ARTIFACTS_DESTINATION=artifacts.as_uri(),
        ALCOT_MLFLOW_AUTH="1",
        MLFLOW_AUTH_DATABASE_URI=pg.uri("mlflow_auth", password=db_password),
        MLFLOW_AUTH_ADMIN_PASSWORD=admin_password,
        MLFLOW_FLASK_SERVER_SECRET_KEY=secret_key,
        **extra,
    )


@contextlib.contextmanager
def mlflow_server(env: dict[str, str], log: Path):
    server = MlflowServer(env, log)
    try:
        yield server.start()
    finally:
        server.stop()


# ------------------------------------------------------------------------------ Slurm
class SlurmCluster:
    """One node (this machine, as ``hostname -s`` at 127.0.0.1): a private munged socket and
    key, slurmctld and slurmd on free ports, every state/spool/log file in a temp folder.
    Clients (sbatch, squeue, scontrol) need ``env()`` (SLURM_CONF)."""

    def __init__(self):
        for tool in ("munged", "slurmctld", "slurmd", "sbatch"):
            found = shutil.which(tool) or os.path.exists(f"/usr/sbin/{tool}")
            require(tool, bool(found), "apt-get install -y slurm-wlm munge")
        require("root (slurmd runs jobs as their user)", os.geteuid() == 0, "run the tests as root")
        self.dir = Path(tempfile.mkdtemp(prefix="alcot-slurm-", dir="/tmp"))
        self.conf = self.dir / "slurm.conf"
        self.procs: list[subprocess.Popen] = []
        self.node = socket.gethostname().split(".")[0]

    @staticmethod
    def _bin(tool: str) -> str:
        return shutil.which(tool) or f"/usr/sbin/{tool}"

    def env(self) -> dict[str, str]:
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def start(self, timeout: float = 90) -> SlurmCluster:
        d = self.dir
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        sock = d / "munge.sock"
        self.procs.append(
            subprocess.Popen(
                [self._bin("munged"), "-F", "-f", f"--socket={sock}", f"--key-file={key}",
                 f"--pid-file={d / 'munged.pid'}", f"--log-file={d / 'munged.log'}",
                 f"--seed-file={d / 'munged.seed'}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
            )
        )  # fmt: skip
        wait_for(sock.exists, 30, "munged", self.procs[-1], d / "munged.log")
        cpus = os.cpu_count() or 1
        for sub in ("state", "spool"):
            (d / sub).mkdir()
        self.conf.write_text(
            textwrap.dedent(f"""\
            ClusterName=alcottest
            SlurmctldHost={self.node}(127.0.0.1)
            SlurmctldPort={free_port()}
            SlurmdPort={free_port()}
            AuthType=auth/munge
            CredType=cred/munge
            AuthInfo=socket={sock}
            SlurmUser=root
            SlurmdUser=root
            StateSaveLocation={d / "state"}
            SlurmdSpoolDir={d / "spool"}
            SlurmctldPidFile={d / "slurmctld.pid"}
            SlurmdPidFile={d / "slurmd.pid"}
            SlurmctldLogFile={d / "slurmctld.log"}
            SlurmdLogFile={d / "slurmd.log"}
            ProctrackType=proctrack/linuxproc
            TaskPlugin=task/none
            JobAcctGatherType=jobacct_gather/none
            SelectType=select/cons_tres
            SelectTypeParameters=CR_Core
            MpiDefault=none
            ReturnToService=2
            NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=4000 State=UNKNOWN
            PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
            """)
        )
        for daemon in ("slurmctld", "slurmd"):
            self.procs.append(
                subprocess.Popen(
                    [self._bin(daemon), "-D", "-f", str(self.conf)],
                    env=self.env(),
                    stdout=open(d / f"{daemon}.out", "w"),  # noqa: SIM115 (closed with the process)
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
            if daemon == "slurmctld":
                time.sleep(1)

        def idle() -> bool:
            res = subprocess.run(
                ["sinfo", "-h", "-o", "%t"], env=self.env(), capture_output=True, text=True
            )
            return res.returncode == 0 and res.stdout.strip() in ("idle", "mix", "alloc")

        wait_for(idle, timeout, "slurm node", self.procs[-1], d / "slurmd.log")
        return self

    def log(self, name: str) -> str:
        path = self.dir / name
        return path.read_text()[-3000:] if path.exists() else ""

    def stop(self) -> None:
        for proc in reversed(self.procs):  # slurmd, slurmctld, then munged
            _stop_group(proc)
        self.procs = []
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def slurm_cluster():
    cluster = SlurmCluster()
    try:
        yield cluster.start()
    finally:
        cluster.stop()


# ------------------------------------------------------------------------------ secrets
def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def find_secrets(paths, secrets: list[str]) -> list[str]:
    """Files under ``paths`` that hold one of ``secrets`` as text or base64 (pass ``user:pw``
    too to catch a basic-auth header): the sweep test in test_infra_mlflow.py runs it on
    everything the sweep wrote."""
    needles = [s.encode() for s in secrets] + [_b64(s).encode() for s in secrets]
    hits = []
    for base in paths:
        base = Path(base)
        files = [base] if base.is_file() else [p for p in base.rglob("*") if p.is_file()]
        for f in files:
            try:
                data = f.read_bytes()
            except OSError:
                continue
            if any(n in data for n in needles):
                hits.append(str(f))
    return hits


def run_record_secrets(client, experiment: str, secrets: list[str]) -> list[str]:
    """Params and tags of every run of ``experiment`` (and the experiment's tags) that hold one
    of ``secrets``."""
    exp = client.get_experiment_by_name(experiment)
    found = [f"experiment tag {k}" for k, v in exp.tags.items() if any(s in v for s in secrets)]
    for r in client.search_runs([exp.experiment_id]):
        data = {**r.data.params, **r.data.tags}
        found += [
            f"{r.info.run_name}: {k}" for k, v in data.items() if any(s in str(v) for s in secrets)
        ]
        found += [
            f"{r.info.run_name}: run info" for s in secrets if s in json.dumps(r.to_dictionary())
        ]
    return found
