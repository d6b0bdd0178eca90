"""MLflow tracking for one run folder: the folder's journal is the record, MLflow a delivery.

Notation: a run folder holds ``metrics.jsonl`` (the journal: one ``{"step", "metrics"}`` row per
logged step, appended before anything is sent), ``artifacts.json`` (every artifact the run
logged), ``params.json``, ``tracking.json`` (the experiment, run name, tags, and the MLflow run of
each store the folder was tracked in) and, once training ended, ``run_status.json``.

Why: a tracking store is a server that goes away, restarts, or is replaced (laptop sqlite ->
team server). Training never waits on it and never fails for it: metrics go to the journal and
an in-memory list, and a background thread delivers whatever the MLflow run lacks, point by
point ((key, step) pairs the run already has are never sent again), with exponential backoff
while the store is unreachable. The run is created in the store when the store first answers
(a run that starts during an outage trains all the same), and when a folder meets a store that
does not know its run (another store, a deleted run), a new run is created and the journal,
params and artifacts are imported into it.

Creating a run is made idempotent: each folder has an id (``folder_id`` in ``tracking.json``,
written before the first attempt) that its runs carry as the tag ``alcot.folder``. A store can
commit a run and go away before its answer arrives (a server stopped or restarted mid-request);
the next attempt finds that run by the tag and takes it over instead of creating a second one.

A run is marked FINISHED (or FAILED) in MLflow only once every journalled metric, tag, param and
artifact is there. What could not be delivered before ``finish`` gave up stays in the folder and
is delivered by :func:`deliver` (``alcot tracking sync RUN_DIR``, or a resubmitted sweep, which
does it for every such trial before training anything).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alcot.common.files import atomic_write_json
from alcot.common.typed import ConfigError
from alcot.orchestrator.tracking.run_folder import (
    read_journal,
    read_record,
    read_status,
)
from alcot.orchestrator.tracking.stores import (
    MAX_BACKOFF,
    ensure_experiment,
    not_found,
    open_client,
    patience,
    resolve_uri,
)

MODEL_URI_TAG = "alcot.model_uri"  # = mlflow_meta.MODEL_URI_TAG (a logged model's URI)
FOLDER_TAG = "alcot.folder"  # the run folder's id on each of its runs (idempotent creation)


@dataclass
class Delivery:
    """What a run folder still owes its MLflow run."""

    metrics: int = 0  # metric values not yet in MLflow
    artifacts: list[str] = field(default_factory=list)
    status: str | None = None  # a final status not yet set
    run_id: str | None = None

    @property
    def complete(self) -> bool:
        return not (self.metrics or self.artifacts or self.status)

    def describe(self) -> str:
        parts = []
        if self.metrics:
            parts.append(f"{self.metrics} metric values")
        if self.artifacts:
            parts.append(f"{len(self.artifacts)} artifacts")
        if self.status:
            parts.append(f"status {self.status}")
        return ", ".join(parts) or "nothing"


class Tracker:
    """Tracks one run folder in one store (see the module docstring)."""

    def __init__(
        self,
        uri: str,
        experiment: str,
        run_dir: Path,
        run_name: str,
        artifact_root: str | None = None,
        tags: dict[str, str] | None = None,
        flush_seconds: float = 1.0,
        log=print,
        params: dict[str, Any] | None = None,
        retag: bool = True,
        fence=None,
        writer: int | None = None,
        replay_from: int | None = None,
    ):
        """``tags`` go on a new run; on the folder's existing run too when ``retag`` (a sweep
        resuming the run takes it over), not when only delivering (the run stays where it is).

        ``fence`` (e.g. ``Lease.check``) is called before every write to the folder and every
        MLflow call, and raises (``LeaseLost``) once the process no longer holds the folder:
        the tracker then stops for good, writing nothing more (see :meth:`abandon`).
        ``writer`` (the lease generation) is stamped on each journal row. ``replay_from``: the
        step training resumed from; a step after it that the journal already holds with the
        same keys is a replay (exact resume) and is not journalled twice."""
        self.uri, self.log = uri, log
        self._fence = fence
        self.fenced: BaseException | None = None
        self._writer = writer
        self._replay_from = replay_from
        self.experiment, self.run_name = experiment, run_name
        self.artifact_root = artifact_root
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.journal_path = self.run_dir / "metrics.jsonl"
        self.flush_seconds = flush_seconds
        self.client = open_client(uri)
        record = read_record(self.run_dir) or {}
        self._stores: dict[str, str] = dict(record.get("stores", {}))
        self.folder_id: str = record.get("folder_id") or uuid.uuid4().hex
        self._base_tags = {**record.get("tags", {}), **(tags or {})}
        self._new_tags = dict(tags or {}) if retag else {}
        self.run_id: str | None = None
        self.resumed = False
        self._lock = threading.Lock()
        self._rows: list[dict] = read_journal(self.run_dir)
        self._journalled: dict[int, set[str]] = {}
        for row in self._rows:
            self._journalled.setdefault(row["step"], set()).update(row["metrics"])
        self._cursor = 0  # rows before it were checked against MLflow (sent or present)
        self._have: dict[str, set[int]] = {}
        params_file = self.run_dir / "params.json"
        if params is None and params_file.exists():
            params = json.loads(params_file.read_text())
        self._params: dict[str, str] = {k: str(v)[:6000] for k, v in (params or {}).items()}
        if params:
            atomic_write_json(params_file, params, indent=1)
        self._params_sent = False
        self._tags: dict[str, str] = {}  # set while running, sent with the next delivery
        self._artifacts: list[dict] = self._read_artifacts()
        self._uploaded: set[int] = set()
        self._failures = 0
        self._warned = False
        self._write_record()
        self._stop = threading.Event()
        self._journal = self._open_journal()
        try:
            self._connect()
        except _Unreachable as err:
            self._warn(err.cause)
        self._thread = threading.Thread(target=self._loop, name="alcot-mlflow", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ folder state
    def _open_journal(self):
        if self.journal_path.exists() and self.journal_path.stat().st_size:
            with open(self.journal_path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
            if torn:  # a kill mid-line: end it, so the next row starts on its own line
                with open(self.journal_path, "a") as f:
                    f.write("\n")
        return open(self.journal_path, "a", buffering=1)  # noqa: SIM115 (closed in finish)

    def _read_artifacts(self) -> list[dict]:
        path = self.run_dir / "artifacts.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return []

    def _write_record(self) -> None:
        atomic_write_json(
            self.run_dir / "tracking.json",
            {
                "uri": self.uri,
                "run_id": self.run_id,
                "experiment": self.experiment,
                "run_name": self.run_name,
                "tags": self._base_tags,
                "stores": self._stores,
                "folder_id": self.folder_id,
            },
            indent=1,
        )

    # ------------------------------------------------------------------ delivery
    def _connect(self) -> None:
        """Find (or create) this folder's run in the store; raises _Unreachable."""
        if self.run_id is not None:
            return
        try:
            known = self._stores.get(self.uri)
            run = None
            if known:
                try:
                    run = self.client.get_run(known)
                except Exception as err:
                    if not not_found(err):
                        raise
                    self.log(
                        f"{self.run_dir}: run {known} is not in {self.uri}; creating a new run "
                        "and importing the folder's metrics, params and artifacts into it"
                    )
            elif self._stores:
                other, rid = next(iter(self._stores.items()))
                self.log(
                    f"{self.run_dir} was tracked in {other} (run {rid}); creating its run in "
                    f"{self.uri} and importing the folder's metrics, params and artifacts"
                )
            if run is None:
                exp_id = ensure_experiment(self.client, self.experiment, self.artifact_root)
                run = self._created_earlier(exp_id)
            # Fenced right before the run is made or taken: a process frozen while its search
            # was in flight (a chaos soak's SIGSTOP, often during a server restart) wakes here
            # after another process took the folder over and already made the folder's run.
            self._check_fence()
            if run is None:
                tags = {**self._base_tags, FOLDER_TAG: self.folder_id}
                run = self.client.create_run(exp_id, run_name=self.run_name, tags=tags)
            else:
                self.resumed = True
                self.client.update_run(run.info.run_id, status="RUNNING")
                for key, value in self._new_tags.items():
                    self.client.set_tag(run.info.run_id, key, value)
            rid = run.info.run_id
            self._params_sent = self.resumed and set(self._params) <= set(run.data.params)
            with self._lock:
                keys = {k for row in self._rows for k in row["metrics"]}
            have = {}
            if self.resumed:
                for key in keys:
                    have[key] = {m.step for m in self.client.get_metric_history(rid, key)}
                present = self._artifact_paths(rid)
                if run.data.tags.get(MODEL_URI_TAG):
                    present |= {self._dest(a) for a in self._artifacts if a.get("kind")}
                self._uploaded = {
                    i for i, a in enumerate(self._artifacts) if self._dest(a) in present
                }
        except ConfigError:
            raise
        except Exception as err:
            raise _Unreachable(err) from err
        with self._lock:
            self._have, self._cursor = have, 0
            self.run_id = rid
        self._stores[self.uri] = rid
        self._write_record()

    def _created_earlier(self, exp_id: str):
        """The run an earlier attempt created for this folder in this store although its answer
        never arrived (None if there is none): found by the folder's tag."""
        runs = self.client.search_runs(
            [exp_id], filter_string=f"tags.`{FOLDER_TAG}` = '{self.folder_id}'", max_results=2
        )
        if not runs:
            return None
        run = runs[0]
        self.log(
            f"{self.run_dir}: run {run.info.run_id} was created in {self.uri} by an earlier "
            "attempt whose answer was lost; taking it over"
        )
        return run

    def _artifact_paths(self, run_id: str) -> set[str]:
        out: set[str] = set()
        folders = {os.path.dirname(self._dest(a)) for a in self._artifacts if not a.get("kind")}
        for folder in folders:
            for info in self.client.list_artifacts(run_id, folder or None):
                out.add(info.path)
        return out

    @staticmethod
    def _dest(item: dict) -> str:
        if item.get("kind") == "model":
            return f"model from {item['path']}"
        name = Path(item["path"]).name
        return f"{item['artifact_path']}/{name}" if item.get("artifact_path") else name

    def _deliver_once(self) -> bool:
        """One pass: connect, then send what MLflow lacks. True when nothing is left."""
        from mlflow.entities import Metric, Param, RunTag

        if not self._may_write():
            return False
        try:
            self._connect()
            rid = self.run_id
            if self._params and not self._params_sent:
                items = [Param(k, v) for k, v in sorted(self._params.items())]
                for i in range(0, len(items), 100):
                    self.client.log_batch(rid, params=items[i : i + 100])
                self._params_sent = True
            with self._lock:
                tags = dict(self._tags)
            if tags:
                self.client.log_batch(rid, tags=[RunTag(k, v) for k, v in tags.items()])
                with self._lock:
                    for k, v in tags.items():
                        if self._tags.get(k) == v:
                            del self._tags[k]
            while True:  # the journal rows past the cursor, a few at a time
                with self._lock:
                    first = self._cursor
                    rows = self._rows[first : first + 30]  # about 750 values (MLflow takes 1000)
                if not rows:
                    break
                todo: dict[tuple[str, int], Metric] = {}  # a resumed step journalled twice: once
                for row in rows:
                    ts = int(row.get("time", time.time()) * 1000)
                    for key, value in row["metrics"].items():
                        if row["step"] not in self._have.get(key, ()):
                            todo[key, row["step"]] = Metric(key, float(value), ts, row["step"])
                if todo:
                    self._check_fence()
                    self.client.log_batch(rid, metrics=list(todo.values()))
                with self._lock:
                    for key, step in todo:
                        self._have.setdefault(key, set()).add(step)
                    self._cursor = first + len(rows)
            for i, item in enumerate(list(self._artifacts)):
                if i not in self._uploaded:
                    path = Path(item["path"])
                    if not path.is_absolute():
                        path = self.run_dir / path
                    if item.get("kind") == "model":
                        self._check_fence()
                        self._deliver_model(rid, path)
                    elif path.exists():
                        self._check_fence()
                        self.client.log_artifact(rid, str(path), item.get("artifact_path"))
                    else:
                        self.log(f"warning: artifact {path} is gone; not uploaded")
                    self._uploaded.add(i)
        except ConfigError:
            raise
        except Exception as err:
            if self.fenced is not None:
                return False
            cause = err.cause if isinstance(err, _Unreachable) else err
            self._warn(cause)
            return False
        if self._warned:
            self.log("tracking store reachable again; the kept metrics and artifacts are sent")
            self._warned = False
        self._failures = 0
        return True

    def _deliver_model(self, rid: str, checkpoint: Path) -> None:
        """Log a manifest's model entry (``mlflow_meta.deliver_model``); a checkpoint that
        does not verify is a warning and the tag ``alcot.model_error``, not a retry."""
        from alcot.orchestrator.export.mlflow_model import deliver_model, model_problem

        problem = model_problem(checkpoint)
        if problem is None:
            deliver_model(self, rid, checkpoint)
        else:
            self.log(f"warning: could not log the model ({problem})")
            self.client.set_tag(rid, "alcot.model_error", problem[:5000])

    def _warn(self, err: BaseException) -> None:
        self._failures += 1
        if not self._warned:
            self._warned = True
            self.log(
                f"warning: tracking store {self.uri} unreachable ({type(err).__name__}: "
                f"{str(err)[:160]}); training goes on, everything is kept in {self.run_dir} "
                "and delivered when the store is back"
            )

    def _backoff(self) -> float:
        return min(MAX_BACKOFF, self.flush_seconds * 2 ** min(self._failures, 8))

    def _loop(self) -> None:
        while not self._stop.wait(self._backoff() if self._failures else self.flush_seconds):
            self._deliver_once()
            if self.fenced is not None:
                return

    # ------------------------------------------------------------------ fencing
    def _check_fence(self) -> None:
        """Raise if the folder is no longer ours (and remember it: nothing is written after)."""
        if self.fenced is not None:
            raise self.fenced
        if self._fence is None:
            return
        try:
            self._fence()
        except Exception as err:
            self.fenced = err
            raise

    def _may_write(self) -> bool:
        try:
            self._check_fence()
            return True
        except Exception:
            return False

    def abandon(self) -> None:
        """Stop without another write (the folder was taken over): the delivery thread ends,
        the journal is closed, no status is kept or sent."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        with contextlib.suppress(ValueError, OSError):
            self._journal.close()

    def pending(self) -> Delivery:
        with self._lock:
            n = 0
            for row in self._rows[self._cursor :]:
                for key in row["metrics"]:
                    if row["step"] not in self._have.get(key, ()):
                        n += 1
        arts = [self._dest(a) for i, a in enumerate(self._artifacts) if i not in self._uploaded]
        return Delivery(metrics=n, artifacts=arts, run_id=self.run_id)

    # ------------------------------------------------------------------ logging API
    def set_tag(self, key: str, value: str) -> None:
        with self._lock:
            self._tags[key] = str(value)[:5000]

    def log_params(self, params: dict[str, Any]) -> None:
        self._params.update({k: str(v)[:6000] for k, v in params.items()})
        atomic_write_json(self.run_dir / "params.json", self._params, indent=1)
        self._params_sent = False

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Called by the training loop: cheap (a journal line and a list append)."""
        self._check_fence()
        if (
            self._replay_from is not None
            and step > self._replay_from
            and set(metrics) <= self._journalled.get(step, set())
        ):
            return  # a step re-trained after a resume: journalled (and delivered) once
        row = {"step": step, "metrics": metrics, "time": time.time()}
        if self._writer is not None:
            row["writer"] = self._writer
        self._journal.write(json.dumps(row) + "\n")
        with self._lock:
            self._rows.append(row)
            self._journalled.setdefault(step, set()).update(metrics)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Record ``path`` as an artifact of the run; it is uploaded with the next delivery."""
        self._check_fence()
        path = Path(path)
        stored = path.relative_to(self.run_dir) if path.is_relative_to(self.run_dir) else path
        item = {"path": str(stored), "artifact_path": artifact_path}
        if item not in self._artifacts:
            self._artifacts.append(item)
            atomic_write_json(self.run_dir / "artifacts.json", self._artifacts, indent=1)

    def log_model(self, checkpoint: Path) -> None:
        """Record the weights in ``checkpoint`` as the run's MLflow model (an entry of the
        delivery manifest); logged with the next delivery that reaches the store."""
        self._check_fence()
        checkpoint = Path(checkpoint)
        stored = (
            checkpoint.relative_to(self.run_dir)
            if checkpoint.is_relative_to(self.run_dir)
            else checkpoint
        )
        item = {"path": str(stored), "artifact_path": None, "kind": "model"}
        if item not in self._artifacts:
            self._artifacts.append(item)
            atomic_write_json(self.run_dir / "artifacts.json", self._artifacts, indent=1)

    def finish(self, status: str | None, timeout: float | None = None) -> bool:
        """Keep ``status`` in the folder, deliver everything (retrying with backoff for up to
        ``timeout`` seconds), then set the status in MLflow. True if the run is complete there.
        ``status`` None: deliver only (the training has not ended)."""
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(ValueError):
            self._journal.close()
        self._check_fence()  # a process that lost the folder keeps and sends nothing
        if status is not None:
            atomic_write_json(self.run_dir / "run_status.json", {"status": status}, indent=1)
        deadline = time.time() + (patience() if timeout is None else timeout)
        while not self._deliver_once() and time.time() < deadline and self.fenced is None:
            time.sleep(min(self._backoff(), max(0.0, deadline - time.time())))
        self._check_fence()
        owed = self.pending()
        if owed.complete and status is not None:
            self._check_fence()
            try:
                self.client.set_terminated(self.run_id, status=status)
            except Exception as err:
                owed.status = status
                self.log(f"warning: could not set the run status {status} ({err})")
        elif status is not None:
            owed.status = status
        self.owed = owed
        if not owed.complete:
            self.log(
                f"warning: not yet in {self.uri}: {owed.describe()}; they are kept in "
                f"{self.run_dir}. A resubmitted sweep delivers them, or: "
                f"alcot tracking sync {self.run_dir}"
            )
        return owed.complete


class _Unreachable(Exception):
    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause


def folder_tracker(
    run_dir: Path, uri: str | None = None, tags: dict[str, str] | None = None, log=print, fence=None
) -> Tracker | None:
    """A Tracker on a run folder that is not training: its own store (or ``uri``), the
    experiment and run name its ``tracking.json`` keeps, existing runs left where they are.
    None when the folder was never tracked."""
    from alcot.orchestrator.config import alcot_home

    run_dir = Path(run_dir)
    record = read_record(run_dir)
    if record is None:
        return None
    uri = uri or record["uri"]
    _, artifact_root = resolve_uri(uri, alcot_home())
    return Tracker(
        uri,
        record["experiment"],
        run_dir,
        record.get("run_name") or run_dir.name,
        artifact_root=artifact_root,
        tags=tags,
        log=log,
        retag=False,
        fence=fence,
    )


def deliver(
    run_dir: Path,
    uri: str | None = None,
    tags: dict[str, str] | None = None,
    log=print,
    timeout: float | None = None,
    fence=None,
) -> Delivery:
    """Bring a run folder's MLflow run up to date: in its own store, or in ``uri`` (a store
    that does not know the folder gets a new run with everything imported). The run gets the
    folder's final status once everything is there. ``fence``: the caller's ``Lease.check``
    (see Tracker)."""
    tracker = folder_tracker(run_dir, uri, tags, log, fence)
    if tracker is None:
        raise ConfigError(str(run_dir), "no tracking.json here: not a tracked run folder")
    before = tracker.pending()
    tracker.finish(read_status(Path(run_dir)), timeout=timeout)
    sent = before.metrics - tracker.owed.metrics
    log(f"sent {sent} metric values to run {tracker.run_id}")
    return tracker.owed


def sync(run_dir: Path, log=print) -> int:
    """``alcot tracking sync``: deliver what the folder's run lacks; returns values still owed
    (0 when the run is complete in its store)."""
    owed = deliver(run_dir, log=log)
    return 0 if owed.complete else owed.metrics + len(owed.artifacts) + 1
