"""Leases: at most one live process works on a run folder (or drives a sweep invocation).

Notation: a lease is the file ``<folder>/lease.json`` holding its owner (host, pid, the
process's start time, a label) and a heartbeat time. The owner rewrites the heartbeat every
``ttl / 3`` seconds from a background thread. A lease is *stale* when its heartbeat is older than
``ttl`` (the owner stopped beating: killed, frozen, or on a machine that went away), or, on the
same host, as soon as its owner process is gone (a SIGKILLed trial need not wait out the ttl).

Why: two invocations of one sweep (a re-run while the first still runs, two people, a retried
CI job), or an orphaned Ray worker still training after its driver died, would otherwise train
the same trial twice into the same folder and MLflow run. Whoever holds the lease trains; the
others wait for it and then find the trial finished (or take over what the holder left).

Claiming is atomic: the file is created with ``O_EXCL``, and a stale lease is taken over under
an ``flock`` on ``<folder>/.lease.lock`` so that two waiters cannot both take it. The lease
lives in the run folder, so it works across machines that share ``ALCOT_HOME`` (the heartbeat,
not the pid, decides there).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

NAME = "lease.json"


def default_ttl() -> float:
    """Seconds without a heartbeat after which a lease is stale (``ALCOT_LEASE_TTL``)."""
    return float(os.environ.get("ALCOT_LEASE_TTL", "30"))


def _start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


@dataclass
class Holder:
    """Who holds a lease, as read from its file."""

    host: str
    pid: int
    started: float  # the owner process's start time (pids are reused)
    label: str
    heartbeat: float

    def describe(self) -> str:
        age = time.time() - self.heartbeat
        return f"{self.label or 'a process'} (pid {self.pid} on {self.host}, beat {age:.0f} s ago)"

    def alive(self, ttl: float) -> bool:
        if time.time() - self.heartbeat > ttl:
            return False
        if self.host == socket.gethostname():
            started = _start_time(self.pid)
            return started is not None and abs(started - self.started) < 1.0
        return True


def read_holder(folder: Path) -> Holder | None:
    """The lease's holder, or None without a (readable) lease."""
    try:
        d = json.loads((Path(folder) / NAME).read_text())
        return Holder(d["host"], int(d["pid"]), float(d["started"]), d["label"], d["heartbeat"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class LeaseLost(RuntimeError):
    """Another process took the lease over (ours went stale): stop writing to the folder."""


class Lease:
    """A claim on ``folder``: :meth:`acquire` (waiting for a live holder), :meth:`release`."""

    def __init__(self, folder: Path, label: str = "", ttl: float | None = None):
        self.folder = Path(folder)
        self.path = self.folder / NAME
        self.label = label
        self.ttl = default_ttl() if ttl is None else ttl
        self.held = False
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        pid = os.getpid()
        self._me = {
            "host": socket.gethostname(),
            "pid": pid,
            "started": _start_time(pid) or 0.0,
            "label": label,
        }

    # ------------------------------------------------------------------ claiming
    def _write(self, flags: int) -> None:
        data = json.dumps({**self._me, "heartbeat": time.time()})
        fd = os.open(self.path, flags, 0o644)
        try:
            os.write(fd, data.encode())
        finally:
            os.close(fd)

    def try_acquire(self) -> Holder | None:
        """Claim the lease if it is free or stale; returns None on success, else the holder."""
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self._write(os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            with open(self.folder / ".lease.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                holder = read_holder(self.folder)
                if holder is not None and holder.alive(self.ttl):
                    return holder
                # stale (or torn): take it over, atomically for readers
                tmp = self.folder / f".{NAME}.{os.getpid()}"
                tmp.write_text(json.dumps({**self._me, "heartbeat": time.time()}))
                os.replace(tmp, self.path)
        self.held = True
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="alcot-lease", daemon=True)
        self._thread.start()
        return None

    def acquire(self, wait: bool = True, log=print, poll: float = 1.0) -> None:
        """Claim the lease, waiting while a live process holds it (saying so once)."""
        said = False
        while True:
            holder = self.try_acquire()
            if holder is None:
                if said:
                    log(f"{self.folder}: the other process is done; continuing here")
                return
            if not wait:
                raise RuntimeError(f"{self.folder} is held by {holder.describe()}")
            if not said:
                log(f"{self.folder} is in use by {holder.describe()}: waiting for it")
                said = True
            time.sleep(poll)

    # ------------------------------------------------------------------ holding
    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            holder = read_holder(self.folder)
            mine = holder is not None and (holder.host, holder.pid) == (
                self._me["host"],
                self._me["pid"],
            )
            if not mine:
                self.lost = True
                return
            with contextlib.suppress(OSError):
                tmp = self.folder / f".{NAME}.{os.getpid()}"
                tmp.write_text(json.dumps({**self._me, "heartbeat": time.time()}))
                os.replace(tmp, self.path)

    def check(self) -> None:
        """Raise :class:`LeaseLost` if another process has taken the lease over."""
        if self.lost:
            raise LeaseLost(f"{self.folder}: the lease was taken over by another process")

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder = read_holder(self.folder)
        if holder is not None and (holder.host, holder.pid) == (
            self._me["host"],
            self._me["pid"],
        ):
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self.held = False

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
