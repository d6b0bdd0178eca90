"""MLflow tracking for one training run, robust to a slow or absent tracking server.

Every metric is first appended to a local journal (``<run dir>/metrics.jsonl``) and queued; a
background thread sends the queue to MLflow with ``log_batch`` every ``flush_seconds``, so the
training loop never waits on the store. If the store is unreachable, the thread keeps the
metrics and retries; at the end anything still unsent is reported with the command that imports
it later (``alcot tracking sync RUN_DIR``), which replays the journal and skips what MLflow
already has. Nothing is dropped silently.

A resumed run continues the same MLflow run (its id is kept in the checkpoints), and steps that
were logged before the interruption are not logged again.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from alcot.model.typed import ConfigError

# We retry ourselves (in the background); MLflow's own retries would block for minutes.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def default_store(home: Path) -> tuple[str, str]:
    """(tracking URI, artifact root) of the embedded store under ``home``: absolute paths."""
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'mlflow.db'}", (home / "mlartifacts").as_uri()


def resolve_uri(configured: str | None, home: Path) -> tuple[str, str | None]:
    """Config field > $MLFLOW_TRACKING_URI > the embedded sqlite store."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri, None
    return default_store(home)


def ensure_experiment(client, name: str, artifact_root: str | None) -> str:
    """The id of experiment ``name``, created (with ``artifact_root``) if it does not exist,
    with the tags that make the MLflow UI show it as model training (``mlflow_meta``)."""
    from .mlflow_meta import experiment_tags, mark_experiment

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        mark_experiment(client, exp.experiment_id, exp.tags)
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root, tags=experiment_tags())


class Tracker:
    def __init__(
        self,
        uri: str,
        experiment: str,
        run_dir: Path,
        run_name: str,
        run_id: str | None = None,
        artifact_root: str | None = None,
        tags: dict[str, str] | None = None,
        flush_seconds: float = 1.0,
        log=print,
    ):
        from mlflow.tracking import MlflowClient

        self.uri, self.log = uri, log
        self.client = MlflowClient(tracking_uri=uri)
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.journal_path = self.run_dir / "metrics.jsonl"
        self.flush_seconds = flush_seconds
        try:
            exp_id = ensure_experiment(self.client, experiment, artifact_root)
            self.last_step = -1
            self.resumed = run_id is not None
            if run_id is not None:
                self.client.get_run(run_id)  # raises if it does not exist
                self.run_id = run_id
                self.last_step = self._max_logged_step("train/loss")
                self.client.update_run(run_id, status="RUNNING")
                for key, value in (tags or {}).items():  # e.g. the sweep invocation resuming it
                    self.client.set_tag(run_id, key, value)
            else:
                run = self.client.create_run(exp_id, run_name=run_name, tags=tags or {})
                self.run_id = run.info.run_id
        except Exception as err:
            raise ConfigError(
                "tracking.uri", f"cannot reach the tracking store {uri}: {err}"
            ) from err
        (self.run_dir / "tracking.json").write_text(
            json.dumps({"uri": uri, "run_id": self.run_id, "experiment": experiment}, indent=1)
        )
        self._queue: deque = deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._failures = 0
        self._warned = False
        self._journal = open(self.journal_path, "a", buffering=1)  # noqa: SIM115 (closed in finish)
        self._thread = threading.Thread(target=self._loop, name="alcot-mlflow", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ logging
    def _max_logged_step(self, key: str) -> int:
        hist = self.client.get_metric_history(self.run_id, key)
        return max((m.step for m in hist), default=-1)

    def set_tag(self, key: str, value: str) -> None:
        try:
            self.client.set_tag(self.run_id, key, str(value)[:5000])
        except Exception as err:
            self.log(f"warning: could not set tag {key} ({err})")

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Called by the training loop: cheap (a journal line and a queue append)."""
        from mlflow.entities import Metric

        self._journal.write(json.dumps({"step": step, "metrics": metrics}) + "\n")
        if step <= self.last_step:
            return  # already in MLflow from before the interruption
        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        with self._lock:
            self._queue.extend(batch)

    def _send(self, max_items: int = 1000) -> bool:
        with self._lock:
            batch = [self._queue.popleft() for _ in range(min(max_items, len(self._queue)))]
        if not batch:
            return True
        try:
            self.client.log_batch(self.run_id, metrics=batch)
        except Exception as err:
            with self._lock:
                self._queue.extendleft(reversed(batch))
            self._failures += 1
            if not self._warned:
                self._warned = True
                self.log(
                    f"warning: tracking store unreachable ({type(err).__name__}); training goes "
                    f"on, metrics are kept in {self.journal_path} and retried"
                )
            return False
        if self._warned and self._failures:
            self.log("tracking store reachable again; sending the kept metrics")
            self._warned = False
        self._failures = 0
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.flush_seconds * (1 + min(self._failures, 10))):
            while self._queue and self._send():
                pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> bool:
        try:
            self.client.log_artifact(self.run_id, str(path), artifact_path)
            return True
        except Exception as err:
            self._remember_artifact(path, artifact_path, err)
            return False

    def _remember_artifact(self, path: Path, artifact_path: str | None, err: Exception) -> None:
        pending = self.run_dir / "pending_artifacts.json"
        items = json.loads(pending.read_text()) if pending.exists() else []
        items.append({"path": str(path), "artifact_path": artifact_path})
        pending.write_text(json.dumps(items, indent=1))
        self.log(f"warning: could not upload {path} ({err}); kept for `alcot tracking sync`")

    def finish(self, status: str, timeout: float = 30.0) -> bool:
        """Flush (retrying up to ``timeout`` seconds), set the run status. True if all sent."""
        self._stop.set()
        self._thread.join()
        deadline = time.time() + timeout
        while self._queue and time.time() < deadline:
            if not self._send():
                time.sleep(min(2.0, max(0.0, deadline - time.time())))
        self._journal.close()
        (self.run_dir / "run_status.json").write_text(json.dumps({"status": status}))
        status_sent = True
        try:
            self.client.set_terminated(self.run_id, status=status)
        except Exception as err:
            status_sent = False
            self.log(f"warning: could not set the run status {status} ({err})")
        if self._queue:
            self.log(
                f"warning: {len(self._queue)} metric values could not be sent to {self.uri}; "
                f"they are in {self.journal_path}. Import them later with: "
                f"alcot tracking sync {self.run_dir}"
            )
            return False
        if not status_sent:
            self.log(f"the status is kept in the run folder: alcot tracking sync {self.run_dir}")
        return status_sent


def read_record(run_dir: Path) -> dict | None:
    """The folder's ``tracking.json`` (store uri, run id, experiment), or None without one."""
    path = Path(run_dir) / "tracking.json"
    return json.loads(path.read_text()) if path.exists() else None


def read_journal(run_dir: Path) -> list[dict]:
    """The folder's ``metrics.jsonl`` rows (``{"step": ..., "metrics": {...}}``), in order."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def sync(run_dir: Path, log=print) -> int:
    """Send whatever the journal has that the MLflow run lacks; returns the values sent."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    run_dir = Path(run_dir)
    info = read_record(run_dir)
    if info is None:
        raise ConfigError(str(run_dir), "no tracking.json here: not a tracked run folder")
    client = MlflowClient(tracking_uri=info["uri"])
    run_id = info["run_id"]
    rows = read_journal(run_dir)
    have: dict[str, set[int]] = {}
    todo = []
    for row in rows:
        for key, value in row["metrics"].items():
            if key not in have:
                have[key] = {m.step for m in client.get_metric_history(run_id, key)}
            if row["step"] not in have[key]:
                have[key].add(row["step"])
                todo.append(Metric(key, float(value), int(time.time() * 1000), row["step"]))
    for i in range(0, len(todo), 1000):
        client.log_batch(run_id, metrics=todo[i : i + 1000])
    pending = run_dir / "pending_artifacts.json"
    if pending.exists():
        for item in json.loads(pending.read_text()):
            client.log_artifact(run_id, item["path"], item["artifact_path"])
        pending.unlink()
    status_file = run_dir / "run_status.json"
    if status_file.exists():
        client.set_terminated(run_id, status=json.loads(status_file.read_text())["status"])
    log(f"sent {len(todo)} metric values to run {run_id}")
    return len(todo)
