"""Chaos soak: sweeps of short trials on the embedded Ray against a real MLflow server on
PostgreSQL, while a seeded schedule injects faults over and over; then the records are checked.

Usage: ``bench/chaos.py --seed S --minutes M`` (needs PostgreSQL's server binaries, as the
infra tests do). For M minutes, rounds of a 12-trial sweep (``--trials``) run one after another
(each round its own study), and every few seconds one fault of these kinds is injected (the
kinds in a seeded shuffled cycle, so that every kind recurs):

* ``worker_kill``: SIGKILL of a training trial worker (Tune retries the trial, which resumes);
* ``driver_kill``: SIGKILL of the sweep driver and its whole embedded Ray, then resubmission;
* ``server_restart``: the MLflow server stopped for a few seconds, then started again;
* ``sigstop``: SIGSTOP of a training worker past its lease ttl (``ALCOT_LEASE_TTL``) while the
  sweep is submitted a second time (the first driver goes on) and a worker of the second
  invocation takes the folder over, then SIGCONT of the frozen one, whose Ray is alive: it must
  write nothing more (fenced leases), and its trial's retry finds the trial trained;
* ``truncated_journal``: a worker SIGKILLed and its journal's last line cut short, as a kill
  mid-write leaves it (the step's checkpoint, written after its journal line, is removed too);
* ``corrupt_checkpoint``: a worker SIGKILLed and its newest checkpoint's weights overwritten
  with garbage (resume must skip it and fall back to the one before).

After the window, the running round is brought to its end (resubmitting while the driver says
some trial did not finish), every Ray process of the soak is stopped, and the records are read
back. Printed last, one JSON line: ``faults`` (count by kind), ``trials``, ``finished``
(trials with a FINISHED MLflow run and a FINISHED folder), ``duplicate_runs`` (trial runs
beyond one per trial), ``missing_points`` (journal (key, step) pairs absent from MLflow),
``duplicate_points`` ((key, step) pairs MLflow holds more than once), ``unloadable_checkpoints``
(checkpoints that do not verify or load; those the soak corrupted itself and training has not
replaced count too), ``trained_twice`` (journal rows a process wrote after another process had
taken the folder over: steps trained by two processes at once; a step re-trained after a kill,
from the last checkpoint, is not double training but the resume), ``wall_s``. The line before
it has more figures (rounds, submissions, trials without a logged model, fenced wake-ups).
Target: every trial finished, 0 in every loss column.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
KINDS = (
    "worker_kill",
    "driver_kill",
    "server_restart",
    "sigstop",
    "truncated_journal",
    "corrupt_checkpoint",
)
TTL = 8.0  # ALCOT_LEASE_TTL in the soak: a SIGSTOP lasts longer than this

SWEEP = """
study: {study}
base:
  model: {{size: micro, method: adaptive, l_max: 2}}
  data: {{builtin_documents: 600, vocab_size: 512, seq_len: 32}}
  train: {{batch_size: 8, lr: 0.01, eval_every: 20, eval_batches: 2, checkpoint_every: 4,
          keep_checkpoints: 3, threads: 1}}
  tracking: {{flush_seconds: 0.5}}
grid:
  model.halting.lambda: {lambdas}
  seed: {seeds}
budget: {{tokens: {tokens}}}
resources: {{cpus: 1}}
max_concurrent: 2
retries: 30
"""


def log(*parts) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}]", *parts, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ processes
class Soak:
    def __init__(self, args, folder: Path, server):
        self.args = args
        self.folder = folder
        self.home = folder / "home"
        self.server = server
        self.rng = random.Random(args.seed)
        self.token = secrets.token_hex(6)  # marks every process a driver starts (its Ray too)
        self.faults: Counter = Counter()
        self.driver: subprocess.Popen | None = None
        self.others: list[subprocess.Popen] = []  # earlier drivers still running (sigstop)
        self.sweep_path: Path | None = None
        self.rounds: list[Path] = []
        self.submissions = 0
        self.corrupted: set[str] = set()
        self.kinds = args.kinds.split(",") if args.kinds else list(KINDS)
        for kind in self.kinds:
            if kind not in KINDS:
                raise SystemExit(f"--kinds: unknown fault kind {kind!r} (one of {KINDS})")
        self.env = dict(
            os.environ,
            ALCOT_HOME=str(self.home),
            MLFLOW_TRACKING_URI=server.url,
            ALCOT_LEASE_TTL=str(TTL),
            ALCOT_TRACKING_PATIENCE="10",
            ALCOT_CHAOS=self.token,
            RAY_DEDUP_LOGS="0",
        )

    # -------------------------------------------------------------- drivers
    def new_round(self) -> None:
        n = len(self.rounds)
        lambdas = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0]
        seeds = list(range(-(-self.args.trials // len(lambdas))))
        grid_l = lambdas[: min(len(lambdas), self.args.trials)]
        path = self.folder / f"round{n}.yaml"
        path.write_text(
            textwrap.dedent(SWEEP).format(
                study=f"chaos-{self.args.seed}-{n}",
                lambdas=json.dumps(grid_l),
                seeds=json.dumps(seeds),
                tokens=self.args.steps * 8 * 32,
            )
        )
        self.rounds.append(path)
        self.sweep_path = path
        self.submit()

    def submit(self) -> None:
        self.submissions += 1
        out = open(self.folder / f"driver{self.submissions}.log", "w")  # noqa: SIM115
        self.driver = subprocess.Popen(
            [str(BIN / "alcot"), "sweep", "run", str(self.sweep_path)],
            cwd=ROOT,
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log(f"submission {self.submissions}: {self.sweep_path.name} (pid {self.driver.pid})")

    def ours(self, spare: set[int] = frozenset()) -> list[psutil.Process]:
        """Every live process a driver of this soak started (the driver, its Ray, the workers)."""
        out = []
        for proc in psutil.process_iter():
            if proc.pid in spare or proc.pid == os.getpid():
                continue
            with contextlib.suppress(psutil.Error):
                if proc.environ().get("ALCOT_CHAOS") == self.token:
                    out.append(proc)
        return out

    def kill_driver(self, spare: set[int] = frozenset()) -> None:
        """SIGKILL the driver and every process of its embedded Ray (but ``spare``)."""
        for driver in [*self.others, self.driver]:
            if driver is not None:
                with contextlib.suppress(ProcessLookupError):
                    driver.kill()
                driver.wait()
        self.others = []
        for _ in range(3):
            procs = self.ours(spare)
            if not procs:
                return
            for proc in procs:
                with contextlib.suppress(psutil.Error):
                    proc.send_signal(signal.SIGCONT)
                    proc.kill()
            psutil.wait_procs(procs, timeout=10)

    # -------------------------------------------------------------- trainers
    def trainers(self) -> list[tuple[int, Path]]:
        """(pid, run folder) of every worker training now (holding its folder's lease)."""
        from alcot.orchestrator.tracking.lease import read_holder

        out = []
        for lease in self.home.glob("runs/*/*/lease.json"):
            holder = read_holder(lease.parent)
            if holder is None or not holder.label.startswith("training"):
                continue
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(holder.pid)
                if (
                    proc.status() != psutil.STATUS_STOPPED
                    and proc.environ().get("ALCOT_CHAOS") == self.token
                ):
                    out.append((holder.pid, lease.parent))
        return out

    def pick_trainer(self, need_checkpoint: bool = False):
        found = self.trainers()
        if need_checkpoint:
            found = [(p, f) for p, f in found if list((f / "checkpoints").glob("step_*"))]
        return self.rng.choice(found) if found else None

    # -------------------------------------------------------------- faults
    def inject(self, kind: str) -> bool:
        """Inject one fault of ``kind``; False when it does not apply now (no trainer yet)."""
        return getattr(self, f"_{kind}")()

    def _worker_kill(self) -> bool:
        pick = self.pick_trainer()
        if pick is None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pick[0], signal.SIGKILL)
        log(f"worker_kill: pid {pick[0]} ({pick[1].name})")
        return True

    def _driver_kill(self) -> bool:
        if self.driver is None or self.driver.poll() is not None:
            return False
        log(f"driver_kill: pid {self.driver.pid}")
        self.kill_driver()
        self.submit()
        return True

    def _server_restart(self) -> bool:
        down = self.rng.uniform(3, 15)
        log(f"server_restart: down for {down:.0f} s")
        self.server.stop()
        time.sleep(down)
        self.server.start()
        return True

    def _sigstop(self) -> bool:
        """Freeze a training worker past its lease ttl while a second invocation of the sweep
        (its own driver, as when a sweep is resubmitted while the first still runs) waits for
        the folder and takes it over; then wake the frozen one, whose Ray is still alive: it
        must stop at its next write (fenced) and its trial be retried and found trained."""
        from alcot.orchestrator.tracking.lease import read_holder

        if self.driver is None or self.driver.poll() is not None:
            return False
        pick = self.pick_trainer()
        if pick is None:
            return False
        pid, folder = pick
        before = read_holder(folder)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
        log(f"sigstop: pid {pid} ({folder.name}) frozen; a second driver submitted")
        self.others.append(self.driver)  # the first driver goes on (its worker frozen)
        self.submit()
        deadline = time.time() + max(120.0, 6 * TTL)
        took_over = False
        while time.time() < deadline:  # until another process has taken the folder over
            holder = read_holder(folder)
            if holder is not None and before and holder.generation > before.generation:
                took_over = True
                break
            if self.driver.poll() is not None:
                break
            time.sleep(0.5)
        time.sleep(self.rng.uniform(0, 4))
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        log(f"sigstop: pid {pid} continued ({'after a takeover' if took_over else 'no takeover'})")
        return True

    def _truncated_journal(self) -> bool:
        pick = self.pick_trainer()
        if pick is None:
            return False
        pid, folder = pick
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).wait(10)
        journal = folder / "metrics.jsonl"
        data = journal.read_bytes() if journal.exists() else b""
        lines = data.rstrip(b"\n").split(b"\n")
        if not data or len(lines[-1]) < 2:
            log(f"truncated_journal: pid {pid} killed before its journal had a line to cut")
            return True  # killed all the same
        last = lines[-1]
        cut = self.rng.randint(1, len(last) - 1)
        with open(journal, "r+b") as f:
            f.truncate(len(data.rstrip(b"\n")) - len(last) + cut)
        with contextlib.suppress(ValueError, KeyError):
            step = json.loads(last)["step"]
            ckpt = folder / "checkpoints" / f"step_{step:08d}"
            if ckpt.exists():  # a kill mid-line comes before that step's checkpoint
                import shutil

                shutil.rmtree(ckpt)
        log(f"truncated_journal: pid {pid} killed, {folder.name}/metrics.jsonl cut mid-line")
        return True

    def _corrupt_checkpoint(self) -> bool:
        pick = self.pick_trainer(need_checkpoint=True)
        if pick is None:
            return False
        pid, folder = pick
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).wait(10)
        ckpts = sorted((folder / "checkpoints").glob("step_*"))
        if not ckpts:
            return True
        target = ckpts[-1] / "tp0.pt"
        size = target.stat().st_size
        with open(target, "r+b") as f:
            f.seek(size // 2)
            f.write(os.urandom(min(4096, size // 4)))
        self.corrupted.add(str(ckpts[-1]))
        log(f"corrupt_checkpoint: pid {pid} killed, {ckpts[-1]} overwritten")
        return True

    # -------------------------------------------------------------- the soak
    def run(self) -> None:
        self.new_round()
        while not self.trainers():  # the window starts with the first training worker
            if self.driver.poll() is not None:
                raise RuntimeError(f"the first driver exited {self.driver.returncode}")
            time.sleep(0.5)
        log(f"training started: faults for {self.args.minutes:g} minutes")
        end = time.time() + 60 * self.args.minutes
        cycle: list[str] = []
        next_at = time.time() + self.rng.uniform(2, 6)
        while True:
            now = time.time()
            self.others = [d for d in self.others if d.poll() is None]
            code = self.driver.poll() if self.driver else None
            if code is not None and self.others:
                pass  # an earlier driver still runs: the round ends when it does
            elif code is not None:
                if code != 0:
                    log(f"driver exited {code}: resubmitting")
                    self.submit()
                elif now < end:
                    self.new_round()
                else:
                    break
            elif now >= next_at and now < end:
                if not cycle:
                    cycle = list(self.kinds)
                    self.rng.shuffle(cycle)
                kind = cycle[0]
                if self.inject(kind):
                    self.faults[kind] += 1
                    cycle.pop(0)
                    next_at = time.time() + self.rng.uniform(5, 12)
                else:
                    next_at = time.time() + 1.0
            if now > end + 60 * max(10.0, 2 * self.args.minutes):
                log("the last round did not end in time: stopping it")
                break
            time.sleep(0.5)
        self.kill_driver()


# ------------------------------------------------------------------------------ checks
def check(soak: Soak) -> dict:
    import torch

    from alcot.model import checkpoints
    from alcot.orchestrator.config import run_dir
    from alcot.orchestrator.sweeps.spec import load_sweep
    from alcot.orchestrator.tracking.run_folder import read_journal, read_status
    from alcot.orchestrator.tracking.stores import open_client

    client = open_client(soak.server.url)
    out = Counter()
    fenced = 0
    for path in soak.rounds:
        sweep = load_sweep(path)
        exp = client.get_experiment_by_name(sweep.spec.study)
        runs = client.search_runs([exp.experiment_id], max_results=5000) if exp else []
        by_hash: dict[str, list] = {}
        for r in runs:
            if "config_hash" in r.data.tags:
                by_hash.setdefault(r.data.tags["config_hash"], []).append(r)
        for t in sweep.trials:
            out["trials"] += 1
            folder = run_dir(t.config, soak.home, t.hash)
            mine = by_hash.get(t.hash, [])
            out["duplicate_runs"] += max(0, len(mine) - 1)
            done = [r for r in mine if r.info.status == "FINISHED"]
            if done and read_status(folder) == "FINISHED":
                out["finished"] += 1
            if not any(r.data.tags.get("alcot.model_uri") for r in done):
                out["models_missing"] += 1
            rows = read_journal(folder)
            writers, top = [], 0
            for row in rows:  # rows after a newer writer's: written by a replaced process
                w = row.get("writer", 0)
                if w < top:
                    out["trained_twice"] += 1
                top = max(top, w)
                writers.append(w)
            want: dict[str, set[int]] = {}
            for row in rows:
                for key in row["metrics"]:
                    want.setdefault(key, set()).add(row["step"])
            steps = {row["step"] for row in rows}
            out["journal_gaps"] += len(set(range(1, t.config.train.steps + 1)) - steps)
            record = folder / "tracking.json"
            rid = json.loads(record.read_text()).get("run_id") if record.exists() else None
            if rid is None and mine:
                rid = mine[0].info.run_id
            for key, wanted in want.items():
                got = [m.step for m in client.get_metric_history(rid, key)] if rid else []
                out["missing_points"] += len(wanted - set(got))
                out["duplicate_points"] += len(got) - len(set(got))
            for ckpt in sorted((folder / "checkpoints").glob("step_*")):
                try:
                    checkpoints.verify(ckpt)
                    for f in ckpt.glob("tp*.pt"):
                        torch.load(f, map_location="cpu", weights_only=True)
                except Exception:
                    out["unloadable_checkpoints"] += 1
                    if str(ckpt) in soak.corrupted:
                        out["unloadable_corrupted_by_soak"] += 1
            log_text = (folder / "trial.log").read_text() if (folder / "trial.log").exists() else ""
            fenced += log_text.count("lost the run folder's lease")
    out["fenced_wakeups"] = fenced
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--trials", type=int, default=12, help="trials per sweep round (>= 12)")
    p.add_argument("--steps", type=int, default=40, help="training steps per trial")
    p.add_argument("--keep", action="store_true", help="keep the soak's folder")
    p.add_argument("--kinds", default="", help="only these fault kinds (comma-separated)")
    args = p.parse_args()
    if args.trials < 12:
        p.error("--trials must be >= 12")
    sys.path.insert(0, str(ROOT / "tests"))
    from services import MlflowServer, Postgres

    t0 = time.time()
    folder = Path(tempfile.mkdtemp(prefix="alcot-chaos-", dir="/tmp"))
    pg = Postgres()
    server = None
    soak = None
    try:
        pg.start()
        pg.create_databases("chaos-db-pw")
        (folder / "artifacts").mkdir()
        env = dict(
            os.environ,
            MLFLOW_BACKEND_STORE_URI=pg.uri("mlflow", password="chaos-db-pw"),
            MLFLOW_ARTIFACTS_DESTINATION=(folder / "artifacts").as_uri(),
            MLFLOW_WORKERS="2",
        )
        server = MlflowServer(env, folder / "server.log").start()
        log(f"postgres on {pg.port}, mlflow server at {server.url}, folder {folder}")
        soak = Soak(args, folder, server)
        soak.run()
        if server.proc is None:
            server.start()
        out = check(soak)
    finally:
        if soak is not None:
            soak.kill_driver()
        if server is not None:
            server.stop()
        pg.stop()
        if not args.keep:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
    extra = {
        "rounds": len(soak.rounds),
        "submissions": soak.submissions,
        "models_missing": out["models_missing"],
        "journal_gaps": out["journal_gaps"],
        "fenced_wakeups": out["fenced_wakeups"],
        "unloadable_corrupted_by_soak": out["unloadable_corrupted_by_soak"],
        "folder": str(folder) if args.keep else None,
    }
    print(json.dumps(extra))
    line = {
        "faults": {k: soak.faults.get(k, 0) for k in KINDS},
        "trials": out["trials"],
        "finished": out["finished"],
        "duplicate_runs": out["duplicate_runs"],
        "missing_points": out["missing_points"],
        "duplicate_points": out["duplicate_points"],
        "unloadable_checkpoints": out["unloadable_checkpoints"],
        "trained_twice": out["trained_twice"],
        "wall_s": round(time.time() - t0, 1),
    }
    print(json.dumps(line))
    ok = line["finished"] == line["trials"] and not any(
        line[k]
        for k in (
            "duplicate_runs",
            "missing_points",
            "duplicate_points",
            "unloadable_checkpoints",
            "trained_twice",
        )
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
