"""The sweep driver's own MLflow records: one parent run per invocation, closed whatever happens.

Notation: an invocation of ``alcot sweep run`` opens a parent run (tag ``alcot.kind`` = sweep or
search) that its trials nest under, and holds a lease on ``$ALCOT_HOME/sweeps/<parent id>/`` for
as long as it drives. A driver that is killed cannot close its parent run; the next invocation
in the same experiment finds parent runs still RUNNING whose driver lease is stale (or absent
on this home) and marks them KILLED, saying so. Why the lease and not the pid alone: drivers
may run on different machines that share ``ALCOT_HOME``; the heartbeat tells across machines.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from alcot.common.typed import ConfigError
from alcot.orchestrator.sweeps.spec import Sweep
from alcot.orchestrator.tracking.lease import Lease, read_holder
from alcot.orchestrator.tracking.stores import ensure_experiment, open_client, resolve_uri, retrying


class Parent:
    """An open parent run: ``client``, ``run_id``, its folder and the driver's lease."""

    def __init__(self, client, run_id: str, folder: Path, lease: Lease):
        self.client, self.run_id, self.folder, self.lease = client, run_id, folder, lease

    def log_artifact(self, path: Path, log=print) -> None:
        retrying(
            lambda: self.client.log_artifact(self.run_id, str(path)),
            f"upload {path.name} to the sweep's parent run (kept in {path.parent})",
            log,
        )

    def set_tag(self, key: str, value: str, log=print) -> None:
        retrying(
            lambda: self.client.set_tag(self.run_id, key, value[:5000]),
            f"tag the sweep's parent run with {key}",
            log,
        )

    def close(self, status: str, log=print) -> None:
        done = retrying(
            lambda: self.client.set_terminated(self.run_id, status=status) or True,
            f"mark the sweep's parent run {self.run_id} {status}",
            log,
        )
        if done is None:
            log("  the next invocation of this sweep marks it")
        self.lease.release()


def mark_stale_parents(client, exp_id: str, home: Path, log=print) -> list[str]:
    """Parent runs of this experiment left RUNNING by a driver that is gone: marked KILLED."""
    stale = []
    runs = client.search_runs(
        [exp_id],
        filter_string="attributes.status = 'RUNNING' and tags.`alcot.kind` != 'analysis'",
        max_results=1000,
    )
    for run in runs:
        tags = run.data.tags
        if tags.get("alcot.kind") not in ("sweep", "search"):
            continue
        if tags.get("alcot.driver_home") != str(home):
            continue  # driven from another ALCOT_HOME: its lease is not visible here
        holder = read_holder(home / "sweeps" / run.info.run_id)
        if holder is not None and holder.alive(Lease(home).ttl):
            continue
        client.set_tag(
            run.info.run_id,
            "alcot.note",
            "left RUNNING by an earlier invocation (its driver was stopped, or the store was "
            "unreachable when it ended); see the trials' own runs",
        )
        client.set_terminated(run.info.run_id, status="KILLED")
        stale.append(run.info.run_id)
        log(
            f"parent run {run.info.run_id} of an earlier invocation was left RUNNING by a driver "
            "that is gone: marked KILLED"
        )
    return stale


def open_parent(sweep: Sweep, home: Path, kind: str, log=print) -> Parent:
    """Open this invocation's parent run (after closing the stale ones), holding its lease."""
    uri, artifact_root = resolve_uri(sweep.spec.tracking_uri, home)
    client = open_client(uri)
    tags: dict[str, Any] = {
        "alcot.sweep_id": sweep.sweep_id,
        "alcot.kind": kind,
        "alcot.driver_home": str(home),
        "alcot.driver_host": socket.gethostname(),
    }

    def create():
        exp_id = ensure_experiment(client, sweep.spec.study, artifact_root)
        mark_stale_parents(client, exp_id, home, log)
        return client.create_run(exp_id, run_name=f"{kind}-{sweep.sweep_id}", tags=tags)

    # a store restarting as the driver starts: retried (with backoff) like the plan's query,
    # then a clear error instead of a traceback
    run = retrying(create, f"open the sweep's parent run in {uri}", log)
    if run is None:
        raise ConfigError("tracking.uri", f"cannot reach the tracking store {uri}")
    folder = home / "sweeps" / run.info.run_id
    lease = Lease(folder, label=f"sweep driver {run.info.run_id[:8]}")
    lease.acquire(wait=False)
    return Parent(client, run.info.run_id, folder, lease)
