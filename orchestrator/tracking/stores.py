"""Tracking stores: which MLflow store a run uses (``resolve_uri``: the embedded sqlite under
``$ALCOT_HOME`` by default), clients on it (``open_client``: a sqlite store is created under a
file lock), experiments, and calls retried while a store is away (``retrying``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path

from alcot.common.typed import ConfigError

# We retry ourselves (in the background); MLflow's own retries would block for minutes.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

MAX_BACKOFF = 30.0  # seconds between delivery attempts at most, while the store is away


def patience() -> float:
    """Seconds a run's end (or the sweep driver) keeps retrying an unreachable store before it
    leaves the rest to a later delivery (``ALCOT_TRACKING_PATIENCE``, default 30)."""
    return float(os.environ.get("ALCOT_TRACKING_PATIENCE", "30"))


# ------------------------------------------------------------------------------ stores
def default_store(home: Path) -> tuple[str, str]:
    """(tracking URI, artifact root) of the embedded store under ``home``: absolute paths."""
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'mlflow.db'}", (home / "mlartifacts").as_uri()


def sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def resolve_uri(configured: str | None, home: Path) -> tuple[str, str | None]:
    """(tracking URI, artifact root for new experiments): config field >
    ``$MLFLOW_TRACKING_URI`` > the embedded sqlite store.

    Artifacts of a sqlite store go beside its database (``mlartifacts/`` in the same folder),
    those of another database store under ``$ALCOT_HOME/mlartifacts``; a tracking server
    (http[s]) decides for itself. Without this, MLflow puts them in ``./mlruns`` of whatever
    directory the process runs in.
    """
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return default_store(home)
    if uri.startswith(("http://", "https://", "databricks")):
        return uri, None
    db = sqlite_path(uri)
    if db is not None:
        return uri, (db.parent / "mlartifacts").as_uri()
    return uri, (home / "mlartifacts").as_uri()


def open_client(uri: str):
    """An ``MlflowClient`` for ``uri`` whose store is ready. A sqlite store is created (its
    schema migrated) under a file lock beside it, so that two processes starting on a fresh
    store do not run the migrations at once. A URI MLflow cannot use is a ConfigError."""
    from mlflow.tracking import MlflowClient

    db = sqlite_path(uri)
    lock = contextlib.nullcontext()
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        lock = open(db.parent / f".{db.name}.lock", "w")  # noqa: SIM115 (closed below)
    with lock:
        if db is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            client = MlflowClient(tracking_uri=uri)
            if db is not None:  # the first use creates (migrates) the database
                client.search_experiments(max_results=1)
        except Exception as err:
            raise ConfigError(
                "tracking.uri", f"cannot use the tracking store {uri}: {err}"
            ) from err
    return client


def ensure_experiment(client, name: str, artifact_root: str | None) -> str:
    """The id of experiment ``name``, created (with ``artifact_root``) if it does not exist,
    with the tags that make the MLflow UI show it as model training (``mlflow_meta``); two
    processes creating it at once both get the one that exists."""
    from alcot.orchestrator.tracking.metadata import experiment_tags, mark_experiment

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        mark_experiment(client, exp.experiment_id, exp.tags)
        return exp.experiment_id
    try:
        return client.create_experiment(
            name, artifact_location=artifact_root, tags=experiment_tags()
        )
    except Exception:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def retrying(fn, what: str, log=print, timeout: float | None = None):
    """``fn()``, retried with backoff for up to ``timeout`` seconds (default: patience()); None
    (and a warning) if the store never answered. For the sweep driver's own bookkeeping."""
    deadline = time.time() + (patience() if timeout is None else timeout)
    delay = 0.5
    while True:
        try:
            return fn()
        except Exception as err:
            if time.time() + delay > deadline:
                log(f"warning: could not {what} ({type(err).__name__}: {str(err)[:200]})")
                return None
            time.sleep(delay)
            delay = min(MAX_BACKOFF, delay * 2)


def not_found(err: Exception) -> bool:
    code = getattr(err, "error_code", "")
    return "RESOURCE_DOES_NOT_EXIST" in str(code) or "not found" in str(err).lower()
