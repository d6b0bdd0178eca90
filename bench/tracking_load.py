"""The team tracking server under the load of a sweep (N simulated trials, 8, 32 and 64).

N simulated trials deliver their metric streams through alcot's own tracking path to
``infra/mlflow/serve.sh`` on PostgreSQL, auth on.

Each simulated trial is an :class:`alcot.orchestrator.tracking.tracker.Tracker` on its own run
folder (journal + background delivery, exactly what a training run uses) fed by a thread that
logs, at ``--step-rate`` steps per second, what the trainer logs every step (loss terms, grad
norm, lr, tokens, the four FLOPs counters, throughput, step time: 13 values) and every 50 steps
the validation metrics (8 more). Trials run as threads in ``--procs`` client processes; PostgreSQL
and the server are started here on 127.0.0.1 (``tests/services.py``, the same as the tests).

For ``--seconds`` the trials log; then each finishes (delivers the rest, marks its run
FINISHED). Measured per N:

* ``points_per_s``: metric values acknowledged by the server during the load window, per
  second (the offered rate is printed beside it: equal when the server keeps up);
* ``p99_delivery_lag_s``: per value, from its journal line being written to the server's answer
  to the ``log_batch`` that carried it. The server answers after its database transaction
  committed, so from then on every reader sees the value;
* ``lost``: journalled (key, step) pairs of the trials that are not in the tracking database
  after they finished (read back with SQL from PostgreSQL, MLflow's ``metrics`` table);
* ``server_cpu_s``: CPU seconds of the MLflow server (all its processes) from the start of the
  load until every trial finished (PostgreSQL's is printed beside it).

Prints one line per N, then a JSON line with every N's figures and the settings, then, last,
one JSON line with exactly ``trials``, ``points_per_s``, ``p99_delivery_lag_s``, ``lost``,
``server_cpu_s`` for the largest N. Not a test: a figure for docs/cluster.md.

    nice -n 10 .venv/bin/python bench/tracking_load.py --trials 8,32,64 --seconds 60 \
        --http-timeout 120    # the settings docs/cluster.md recommends
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ADMIN_PW = "load-bench-admin-pw-0123"
DB_PW = "load-bench-db-pw"
KEYS = ("trials", "points_per_s", "p99_delivery_lag_s", "lost", "server_cpu_s")

STEP_KEYS = (
    "train/loss", "train/ce", "train/adapt", "train/mean_depth", "train/grad_norm", "lr",
    "tokens_seen", "flops/nominal", "flops/realised", "flops/paper", "flops/kernel",
    "throughput/tokens_per_s", "time/step_s",
)  # fmt: skip
VAL_EVERY = 50


def step_metrics(step: int, trial: int) -> dict[str, float]:
    """What the trainer logs at ``step`` (model/trainer.py), with plausible values."""
    loss = 3.0 + 5.0 / math.sqrt(step + 1) + 0.01 * trial
    tokens = float(step * 8192)
    m = {
        "train/loss": loss,
        "train/ce": loss - 0.01,
        "train/adapt": 0.01,
        "train/mean_depth": 1.5,
        "train/grad_norm": 0.8,
        "lr": 3e-4,
        "tokens_seen": tokens,
        "flops/nominal": 6e9 * tokens,
        "flops/realised": 4.5e9 * tokens,
        "flops/paper": 6.2e9 * tokens,
        "flops/kernel": 7e9 * tokens,
        "throughput/tokens_per_s": 50_000.0,
        "time/step_s": 0.16,
    }
    if step % VAL_EVERY == 0:
        m.update({"val/loss": loss + 0.1, "val/ppl": math.exp(loss + 0.1), "val/mean_depth": 1.4})
        m.update({f"val/depth_frac_{k}": 0.25 for k in range(4)})
        m["flops/realised_log10"] = math.log10(
            m["flops/realised"]
        )  # tracking.metadata.scaling_metrics
    return m


# ------------------------------------------------------------------------------ client side
def client_process(
    trials: list[int], uri: str, experiment: str, folder: str, step_rate: float,
    flush: float, ready, go, stop_at, out: str, drain: float,
):  # fmt: skip
    """One client process: a Tracker per trial (delivery thread) and a logging thread each."""
    os.environ["ALCOT_HOME"] = folder
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (MLflow prints each run's address)
    from alcot.orchestrator.tracking.tracker import Tracker

    lags: list[float] = []
    warnings: list[str] = []  # what the trackers said about the store (first few kept)
    acked_in_window = [0]
    lock = threading.Lock()
    window_end = [math.inf]

    def timed(orig):
        def log_batch(run_id, metrics=(), params=(), tags=(), **kw):
            res = orig(run_id, metrics=metrics, params=params, tags=tags, **kw)
            now = time.time()
            with lock:
                lags.extend(now - m.timestamp / 1000 for m in metrics)
                if now <= window_end[0]:
                    acked_in_window[0] += len(metrics)
            return res

        return log_batch

    trackers = []
    for i in trials:
        t = Tracker(
            uri,
            experiment,
            Path(folder) / "runs" / f"trial{i:03d}",
            f"load-trial{i:03d}",
            tags={"alcot.sweep_id": "load", "alcot.kind": "trial"},
            flush_seconds=flush,
            log=lambda msg: warnings.append(str(msg)[:300]) if "warning" in str(msg) else None,
            params={"model.size": "nano", "model.method": "adaptive", "trial": i},
        )
        t.client.log_batch = timed(t.client.log_batch)
        trackers.append(t)
    ready.put(len(trackers))
    go.wait()
    start = time.time()
    end = stop_at.value
    window_end[0] = end
    written = [0]

    def feed(k: int, t) -> None:
        period = 1.0 / step_rate
        nxt = start + period * (k / max(1, len(trackers)))  # trials not in lockstep
        step = 0
        while True:
            nxt += period
            delay = nxt - time.time()
            if delay > 0:
                time.sleep(delay)
            if time.time() >= end:
                return
            step += 1
            m = step_metrics(step, trials[k])
            t.on_metrics(step, m)
            with lock:
                written[0] += len(m)

    feeders = [threading.Thread(target=feed, args=(k, t)) for k, t in enumerate(trackers)]
    for th in feeders:
        th.start()
    for th in feeders:
        th.join()
    owed = [0] * len(trackers)

    def finish(k: int, t) -> None:
        t.finish("FINISHED", timeout=drain)
        owed[k] = t.owed.metrics

    finishers = [threading.Thread(target=finish, args=(k, t)) for k, t in enumerate(trackers)]
    for th in finishers:
        th.start()
    for th in finishers:
        th.join()
    result = {
        "lags": lags,
        "acked_in_window": acked_in_window[0],
        "written": written[0],
        "owed": sum(owed),
        "finished_at": time.time(),
        "runs": {str(t.run_dir): t.run_id for t in trackers},
        "warnings": warnings[:5],
    }
    Path(out).write_text(json.dumps(result))


# ------------------------------------------------------------------------------ measurement
def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of ``pid``, its live descendants and its reaped children."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            c = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += c.user + c.system + c.children_user + c.children_system
    return total


def postmaster_pid(pg) -> int:
    return int((pg.data / "postmaster.pid").read_text().splitlines()[0])


def database_points(pg, run_ids: list[str]) -> dict[tuple[str, str, int], int]:
    """(run, key, step) -> rows in MLflow's ``metrics`` table, for ``run_ids``."""
    import psycopg

    dsn = f"host=127.0.0.1 port={pg.port} dbname=mlflow user=mlflow password={DB_PW}"
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT run_uuid, key, step, count(*) FROM metrics WHERE run_uuid = ANY(%s) "
            "GROUP BY run_uuid, key, step",
            (run_ids,),
        ).fetchall()
    return {(r, k, s): n for r, k, s, n in rows}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(math.ceil(q * len(values))) - 1)]


def run_load(n: int, args, pg, server, folder: Path) -> dict:
    from alcot.orchestrator.tracking.run_folder import read_journal

    ctx = mp.get_context("spawn")
    log_start = server.log.stat().st_size if server.log.exists() else 0
    ready, go = ctx.Queue(), ctx.Event()
    stop_at = ctx.Value("d", math.inf)
    experiment = f"load-{n}-{int(time.time())}"
    procs_n = max(1, min(args.procs, n))
    outs, procs = [], []
    for p in range(procs_n):
        out = folder / f"client{p}.json"
        outs.append(out)
        proc = ctx.Process(
            target=client_process,
            args=(list(range(p, n, procs_n)), server.url, experiment, str(folder),
                  args.step_rate, args.flush, ready, go, stop_at, str(out), args.drain),
        )  # fmt: skip
        proc.start()
        procs.append(proc)
    for _ in procs:  # every trial's run created (experiment, run, params): then the load starts
        ready.get(timeout=600)
    pg_pid = postmaster_pid(pg)
    cpu0, pg0 = tree_cpu(server.proc.pid), tree_cpu(pg_pid)
    t0 = time.time()
    stop_at.value = t0 + args.seconds
    go.set()
    for proc in procs:
        proc.join()
        if proc.exitcode != 0:
            raise RuntimeError(f"a client process failed ({proc.exitcode})")
    done = time.time()
    server_cpu = tree_cpu(server.proc.pid) - cpu0
    pg_cpu = tree_cpu(pg_pid) - pg0
    results = [json.loads(o.read_text()) for o in outs]
    lags = [x for r in results for x in r["lags"]]
    runs = {d: rid for r in results for d, rid in r["runs"].items()}
    stored = database_points(pg, [rid for rid in runs.values() if rid])
    expected = lost = 0
    for run_dir, rid in runs.items():
        for row in read_journal(Path(run_dir)):
            for key in row["metrics"]:
                expected += 1
                lost += (rid, key, row["step"]) not in stored
    duplicates = sum(c - 1 for c in stored.values() if c > 1)
    for w in {w for r in results for w in r["warnings"]}:
        print(f"  trials={n} client: {w}", file=sys.stderr)
    with open(server.log, errors="replace") as f:
        f.seek(log_start)
        errors = [ln for ln in f.read().splitlines() if "ERROR" in ln or "Error" in ln]
    for line in errors[-5:]:
        print(f"  trials={n} server: {line[:300]}", file=sys.stderr)
    written = sum(r["written"] for r in results)
    acked = sum(r["acked_in_window"] for r in results)
    return {
        "trials": n,
        "points_per_s": round(acked / args.seconds, 1),
        "p99_delivery_lag_s": round(percentile(lags, 0.99), 3),
        "lost": lost,
        "server_cpu_s": round(server_cpu, 1),
        "offered_points_per_s": round(written / args.seconds, 1),
        "p50_delivery_lag_s": round(percentile(lags, 0.50), 3),
        "max_delivery_lag_s": round(max(lags), 3) if lags else None,
        "journalled": expected,
        "duplicates": duplicates,
        "owed_after_finish": sum(r["owed"] for r in results),
        "drain_s": round(done - stop_at.value, 1),
        "postgres_cpu_s": round(pg_cpu, 1),
        "server_errors": len(errors),
    }


def parse_trials(text: str) -> list[int]:
    try:
        ns = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        ns = []
    if not ns or any(n < 1 for n in ns):
        raise argparse.ArgumentTypeError(f"positive integers separated by commas, got {text!r}")
    return sorted(set(ns))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--trials",
        type=parse_trials,
        default=[8, 32, 64],
        help="simulated trial counts, run in sequence (default 8,32,64)",
    )
    p.add_argument("--seconds", type=float, default=60.0, help="load window per N")
    p.add_argument("--step-rate", type=float, default=2.0, help="logged steps/s per trial")
    p.add_argument(
        "--flush",
        type=float,
        default=None,
        help="tracking.flush_seconds of each trial (default: the run config's default)",
    )
    p.add_argument("--workers", type=int, default=2, help="MLFLOW_WORKERS of serve.sh")
    p.add_argument(
        "--auth-cache",
        type=int,
        default=60,
        help="ALCOT_MLFLOW_AUTH_CACHE_SECONDS of serve.sh (0: hash every request)",
    )
    p.add_argument(
        "--http-timeout",
        type=float,
        default=float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")),
        help="MLFLOW_HTTP_REQUEST_TIMEOUT of the trials (default: as a trial gets it, 10 s "
        "unless set in the environment)",
    )
    p.add_argument(
        "--pool-size",
        type=int,
        default=0,
        help="MLFLOW_SQLALCHEMYSTORE_POOL_SIZE of the server (0: MLflow's default, 5 + 10)",
    )
    p.add_argument("--procs", type=int, default=4, help="client processes hosting the trials")
    p.add_argument(
        "--drain",
        type=float,
        default=300.0,
        help="seconds each trial's finish may take to deliver the rest",
    )
    args = p.parse_args()  # fmt: skip
    if args.flush is None:
        from alcot.orchestrator.config import TrackingConfig

        args.flush = TrackingConfig().flush_seconds
    for name in ("seconds", "step_rate", "flush"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.workers < 1 or args.procs < 1 or args.auth_cache < 0 or args.pool_size < 0:
        p.error("--workers and --procs must be >= 1, --auth-cache and --pool-size >= 0")
    if args.http_timeout <= 0:
        p.error("--http-timeout must be positive")

    sys.path.insert(0, str(ROOT / "tests"))
    from services import (  # the tests' real services on 127.0.0.1
        MlflowServer,
        Postgres,
        auth_server_env,
    )

    folder = Path(tempfile.mkdtemp(prefix="alcot-load-"))
    artifacts = folder / "artifacts"
    artifacts.mkdir()
    os.environ["ALCOT_HOME"] = str(folder)
    os.environ["MLFLOW_TRACKING_USERNAME"] = "admin"  # inherited by the client processes
    os.environ["MLFLOW_TRACKING_PASSWORD"] = ADMIN_PW
    # as a trial's delivery thread has them (tracking.py), also in the spawned processes
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = f"{args.http_timeout:g}"
    pg = Postgres()
    server = None
    table = []
    try:
        pg.start()
        pg.create_databases(DB_PW)
        env = auth_server_env(
            pg,
            artifacts,
            DB_PW,
            ADMIN_PW,
            "load-bench-secret-key-0123456789",
            ALCOT_MLFLOW_AUTH_CACHE_SECONDS=str(args.auth_cache),
            MLFLOW_WORKERS=str(args.workers),
        )
        if args.pool_size:
            env["MLFLOW_SQLALCHEMYSTORE_POOL_SIZE"] = str(args.pool_size)
            env["MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW"] = str(args.pool_size)
        server = MlflowServer(env, folder / "mlflow.log").start()
        for n in args.trials:
            row = run_load(n, args, pg, server, folder / f"n{n}")
            table.append(row)
            print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    finally:
        if server is not None:
            server.stop()
        pg.stop()
        shutil.rmtree(folder, ignore_errors=True)
    settings = {
        "seconds": args.seconds, "step_rate": args.step_rate, "flush_seconds": args.flush,
        "workers": args.workers, "auth_cache_seconds": args.auth_cache, "procs": args.procs,
        "http_timeout": args.http_timeout, "pool_size": args.pool_size or "default",
        "cpus": os.cpu_count(),
    }  # fmt: skip
    print(json.dumps({"settings": settings, "table": table}))
    last = table[-1]
    print(json.dumps({k: last[k] for k in KEYS}))
    return 0 if all(r["lost"] == 0 for r in table) else 1


if __name__ == "__main__":
    sys.exit(main())
