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

Fencing: every claim gets a *generation*, one more than the folder's last (kept in
``<folder>/.lease.gen``), recorded in the lease. A holder that was frozen past ``ttl`` (SIGSTOP,
swap, a long pause) and replaced finds, on waking, a lease with another holder or a newer
generation: :meth:`Lease.check` (which the trainer and the tracker call before each journal line,
checkpoint, artifact and MLflow call) raises :class:`LeaseLost`, and the process stops before
writing. ``check`` also renews a heartbeat older than ``ttl / 2`` under the flock, so a check
that passes leaves the holder at least ``ttl / 2`` before anyone may take over. The window that
remains (a file system has no compare-and-write): a process frozen for more than ``ttl / 2``
*between* a passing check and the write it guards (a few milliseconds for a journal line, the
time ``torch.save`` takes for a checkpoint) can still land that one write after the takeover;
its next check stops it. Journal rows carry the generation, so such a row is recognisable.
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

from alcot.common.files import atomic_write

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
    generation: int = 0

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
        return Holder(
            d["host"],
            int(d["pid"]),
            float(d["started"]),
            d["label"],
            d["heartbeat"],
            int(d.get("generation", 0)),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


GENERATION = ".lease.gen"


def _read_generation(folder: Path) -> int:
    try:
        return int((Path(folder) / GENERATION).read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


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
        self.generation = 0
        self.beat_at = 0.0
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
    def _lock(self, timeout: float = 10.0):
        """The folder's flock, waited for at most ``timeout`` seconds (its holder may be a
        process frozen mid-renewal): TimeoutError then."""
        lock = open(self.folder / ".lease.lock", "w")  # noqa: SIM115 (closed by the caller)
        deadline = time.time() + timeout
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return lock
            except BlockingIOError:
                if time.time() > deadline:
                    lock.close()
                    raise TimeoutError(f"{self.folder}: the lease lock stays taken") from None
                time.sleep(0.05)

    def _payload(self) -> str:
        return json.dumps({**self._me, "generation": self.generation, "heartbeat": time.time()})

    def _replace(self) -> None:
        """Write the lease (atomically for readers); the caller holds the flock."""
        atomic_write(self.path, self._payload())
        self.beat_at = time.time()

    def _mine(self, holder: Holder | None) -> bool:
        return holder is not None and (holder.host, holder.pid, holder.generation) == (
            self._me["host"],
            self._me["pid"],
            self.generation,
        )

    def try_acquire(self) -> Holder | None:
        """Claim the lease if it is free or stale; returns None on success, else the holder.
        Each claim takes the folder's next generation (see the module docstring)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            lock = self._lock()
        except TimeoutError:  # someone is mid-claim (or frozen in it): as if held
            return read_holder(self.folder) or Holder("?", 0, 0.0, "a process claiming it", 0.0)
        with lock:
            holder = read_holder(self.folder)
            if holder is not None and holder.alive(self.ttl):
                return holder
            # free, stale or torn: take it, with the next generation
            last = max(_read_generation(self.folder), holder.generation if holder else 0)
            self.generation = last + 1
            atomic_write(self.folder / GENERATION, str(self.generation))
            self._replace()
        self.held = True
        self.lost = False
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
            if not self._renew():
                return

    def _renew(self) -> bool:
        """Rewrite the heartbeat if the lease is still ours (under the flock, so that a takeover
        cannot happen between the look and the write); False (and ``lost``) if it is not."""
        if self.lost:
            return False
        try:
            with self._lock():
                if not self._mine(read_holder(self.folder)):
                    self.lost = True
                    return False
                self._replace()
        except (OSError, TimeoutError):
            pass  # a full or flaky disk, a busy lock: the next beat (or check) looks again
        return True

    def check(self) -> None:
        """Raise :class:`LeaseLost` unless this process still holds the lease. Called before
        every write to the folder (fencing): reads the lease, and renews a heartbeat older than
        ``ttl / 2`` (a process that just woke from a freeze) before saying yes."""
        if not self.held:
            return
        if not self.lost:
            if time.time() - self.beat_at > self.ttl / 2:
                self._renew()
            if not self.lost and not self._mine(read_holder(self.folder)):
                self.lost = True
        if self.lost:
            holder = read_holder(self.folder)
            now = f"; it is now held by {holder.describe()}" if holder else ""
            raise LeaseLost(
                f"{self.folder}: this process (pid {os.getpid()}, lease generation "
                f"{self.generation}) lost its lease: it was frozen or cut off for longer than "
                f"ALCOT_LEASE_TTL={self.ttl:g} s and another process took the folder over{now}. "
                "Stopping without writing anything more."
            )

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(OSError, TimeoutError), self._lock():
            if self._mine(read_holder(self.folder)):
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
        self.held = False

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
