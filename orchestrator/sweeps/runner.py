"""Run a grid sweep on Ray Tune: plan, skip finished trials, resume unfinished ones, track them.

The driver starts an embedded local Ray (or joins ``--address``), opens a parent MLflow run for
this invocation (``parents``), and lets Tune schedule one trial per planned config with
``max_concurrent`` at a time and ``retries`` retries. A trial is ``run_training`` on its config
(``trial``): it claims its run folder, resumes from its own checkpoints when it has some, so a
retried, resubmitted or driver-killed trial continues where it stopped and into the same MLflow
run. Trials with a FINISHED MLflow run of the same identity are skipped; trials whose training
finished but whose MLflow run lacks something (a tracking outage, another store) are delivered
from their folders without training; trials another invocation is running are waited for.
Trials of several workers (tensor x data parallel) run under Ray Train's ``TorchTrainer``,
which places them as a gang and sets up torch.distributed across them.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alcot.common.typed import ConfigError
from alcot.model import checkpoints
from alcot.orchestrator.config import alcot_home, run_dir
from alcot.orchestrator.sweeps.parent_runs import open_parent
from alcot.orchestrator.sweeps.ray_tune import in_home, init_ray, live_table, tune_run_config
from alcot.orchestrator.sweeps.spec import Sweep, Trial, describe
from alcot.orchestrator.sweeps.trial import backoff, error_line, results_from_run_dir, trial_body
from alcot.orchestrator.tracking.lease import Lease, default_ttl, read_holder
from alcot.orchestrator.tracking.run_folder import read_status
from alcot.orchestrator.tracking.stores import open_client, resolve_uri, retrying
from alcot.orchestrator.tracking.tracker import deliver


@dataclass
class PlannedTrial:
    trial: Trial
    action: str  # run | resume | skip | deliver | wait
    run_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # a skipped trial's final metrics
    note: str = ""


def finished_runs(client, experiment: str) -> dict[str, Any]:
    """config hash -> a FINISHED run of the experiment, in one paged query (not one per trial:
    planning a sweep of thousands of trials must take seconds)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return {}
    out: dict[str, Any] = {}
    token = None
    while True:
        page = client.search_runs(
            [exp.experiment_id],
            filter_string="attributes.status = 'FINISHED'",
            max_results=1000,
            page_token=token,
        )
        for run in page:
            h = run.data.tags.get("config_hash")
            if h and h not in out:
                out[h] = run
        token = page.token
        if not token:
            return out


def plan(sweep: Sweep, home: Path | None = None, log=print) -> list[PlannedTrial]:
    """What each trial will do: skip (a FINISHED run exists), deliver (trained, but its MLflow
    run lacks something), wait (another live process holds its folder), resume (checkpoints),
    or run."""
    home = home or alcot_home()
    uri, _ = resolve_uri(sweep.spec.tracking_uri, home)
    fresh_store = uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).exists()
    # a dry run must not create the store
    done = {}
    if not fresh_store:
        client = open_client(uri)
        done = retrying(lambda: finished_runs(client, sweep.spec.study), "read the store", log)
        if done is None:
            raise ConfigError("tracking.uri", f"cannot reach the tracking store {uri}")
    ttl = default_ttl()
    out = []
    for t in sweep.trials:
        run = done.get(t.hash)
        if run is not None and not eval_pending(sweep, t, home):
            out.append(PlannedTrial(t, "skip", run.info.run_id, run.data.metrics))
            continue
        if run is not None:  # trained before the sweep had (this) eval section
            out.append(PlannedTrial(t, "evaluate"))
            continue
        folder = run_dir(t.config, home, t.hash)
        holder = read_holder(folder)
        if holder is not None and holder.alive(ttl):
            out.append(PlannedTrial(t, "wait", note=f"in use by {holder.describe()}"))
            continue
        info = checkpoints.latest_valid(folder / "checkpoints")
        trained = info is not None and info.step >= t.config.train.steps
        if trained and read_status(folder) == "FINISHED" and eval_pending(sweep, t, home):
            out.append(PlannedTrial(t, "evaluate"))
            continue
        if trained and read_status(folder) == "FINISHED":
            out.append(PlannedTrial(t, "deliver"))
            continue
        out.append(PlannedTrial(t, "resume" if info else "run"))
    return out


def eval_pending(sweep: Sweep, trial, home: Path) -> bool:
    """The sweep has an ``eval:`` section and the trial's folder has no result of it yet."""
    if sweep.spec.eval is None:
        return False
    from alcot.orchestrator.evaluation.results import done_before
    from alcot.orchestrator.evaluation.suite import spec_from_section

    spec = spec_from_section(sweep.spec.eval.resolved(sweep.path.parent))
    return done_before(run_dir(trial.config, home, trial.hash), spec) is None


def _eval_section(sweep: Sweep) -> dict | None:
    return None if sweep.spec.eval is None else sweep.spec.eval.resolved(sweep.path.parent)


def _fmt_flops(x: float) -> str:
    return f"{x:.2e}"


def plan_table(planned: list[PlannedTrial]) -> str:
    rows = [("trial", "size", "params", "method", "lambda", "tokens", "est FLOPs", "action")]
    for p in planned:
        d = describe(p.trial)
        rows.append(
            (
                d["trial"],
                d["size"],
                f"{d['params'] / 1e6:.2f}M",
                d["method"],
                "-" if d["lambda"] is None else f"{d['lambda']:g}",
                str(d["tokens"]),
                _fmt_flops(d["est_flops"]),
                p.action,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


# ------------------------------------------------------------------------------ trial code
def tune_trainable(config: dict, home: str, parent: str, sweep_id: str, threads: int) -> None:
    from ray import tune

    p = config["p"]
    tags = {"mlflow.parentRunId": parent, "alcot.sweep_id": sweep_id, "alcot.trial": p["hash"]}
    tune.report(trial_body(p["trial"], home, tags, threads, eval_section=p.get("eval")))


def gang_trainable(
    config: dict,
    home: str,
    parent: str,
    sweep_id: str,
    threads: int,
    workers: int,
    cpus: float,
    gpus: float,
) -> None:
    """A multi-worker trial: Ray Train places ``workers`` processes as a gang and sets up
    torch.distributed across them; each runs the same training (tensor x data parallel). This
    process holds the run folder's lease for the whole gang."""
    from ray import train, tune
    from ray.train.torch import TorchConfig, TorchTrainer

    from alcot.orchestrator.sweeps.trial import TrialLog, trial_config

    point = {
        **config["p"],
        "home": home,
        "parent": parent,
        "sweep_id": sweep_id,
        "threads": threads,
    }
    folder = run_dir(trial_config(point["trial"]), Path(home))
    log = TrialLog(folder)
    backoff(folder, {"mlflow.parentRunId": parent}, log)
    trainer = TorchTrainer(
        train_worker_loop,
        train_loop_config=point,
        scaling_config=train.ScalingConfig(
            num_workers=workers,
            use_gpu=gpus > 0,
            resources_per_worker={"CPU": cpus, **({"GPU": gpus} if gpus else {})},
        ),
        torch_config=TorchConfig(backend="nccl" if gpus > 0 else "gloo"),
        run_config=train.RunConfig(
            name=f"{sweep_id}-{point['hash'][:10]}",
            storage_path=str(Path(home) / "ray_results"),
        ),
    )
    with Lease(folder, label=f"gang trial {point['hash'][:10]}") as _:
        trainer.fit()  # raises if a worker failed
    if point.get("eval"):  # evaluation runs in this process, on one worker's worth of CPU
        from alcot.orchestrator.evaluation.results import evaluate_trial

        evaluate_trial(folder, point["eval"], log=log)
    tune.report(results_from_run_dir(point["trial"], home))


def train_worker_loop(config: dict) -> None:
    """Per-worker loop of a multi-worker trial under Ray Train (torch.distributed is set up);
    rank 0 tracks, and the driver reads the results back from the run folder."""
    tags = {
        "mlflow.parentRunId": config["parent"],
        "alcot.sweep_id": config["sweep_id"],
        "alcot.trial": config["hash"],
    }
    trial_body(config["trial"], config["home"], tags, config["threads"], lease=False)


def _point(config: dict) -> dict:
    """The planned point inside a Tune trial's config."""
    return config["p"]


# ------------------------------------------------------------------------------ the driver
def _deliver_trained(todo: list[PlannedTrial], home: Path, parent_id: str, sweep, log) -> dict:
    """Trials whose training finished but whose MLflow run lacks something: delivered from
    their folders, here in the driver (no training, no Ray)."""
    out: dict[str, dict] = {}
    uri, _ = resolve_uri(sweep.spec.tracking_uri, home)
    for p in todo:
        folder = run_dir(p.trial.config, home, p.trial.hash)
        tags = {
            "mlflow.parentRunId": parent_id,
            "alcot.sweep_id": sweep.sweep_id,
            "alcot.trial": p.trial.hash,
        }
        with Lease(folder, label="sweep driver delivering") as claim:
            owed = deliver(folder, uri, tags=tags, log=log, fence=claim.check)
        metrics = results_from_run_dir(p.trial.config.to_dict(), str(home))
        metrics["run_id"] = owed.run_id or ""
        metrics["owed"] = "" if owed.complete else owed.describe()
        out[p.trial.hash] = metrics
    return out


def run_sweep(sweep: Sweep, address: str | None = None, dry_run: bool = False, log=print) -> int:
    """Plan and (unless ``dry_run``) run a grid sweep. Returns the exit code: 0 if every trial
    ended finished (or was already), 1 otherwise."""
    home = alcot_home()
    spec = sweep.spec
    planned = plan(sweep, home, log)
    log(f"sweep {sweep.sweep_id} of study {spec.study!r}: {len(planned)} trials")
    log(plan_table(planned))
    for p in planned:
        if p.note:
            log(f"  {p.trial.short}: {p.note}; this invocation waits for it")
    if dry_run:
        return 0
    parent = open_parent(sweep, home, "sweep", log)
    sweep_copy = parent.folder / sweep.path.name
    sweep_copy.write_text(sweep.text)
    parent.log_artifact(sweep_copy, log)
    log(f"MLflow parent run {parent.run_id} (experiment {spec.study!r})")
    outcomes: dict[str, dict] = {}
    ok = False
    try:
        to_deliver = [p for p in planned if p.action == "deliver"]
        if to_deliver:
            log(f"delivering {len(to_deliver)} trained trials from their run folders")
            outcomes.update(_deliver_trained(to_deliver, home, parent.run_id, sweep, log))
        todo = [p for p in planned if p.action in ("run", "resume", "wait", "evaluate")]
        if todo:
            outcomes.update(_fit(sweep, todo, home, parent.run_id, address, log))
        rows, ok = _summary_rows(planned, outcomes)
        _write_summary(rows, parent, log)
        errors = [f"{r['trial']}: {r['error']}" for r in rows if r["error"]]
        if errors:  # failed trials may have no run of their own (bad data): say it here
            parent.set_tag("alcot.errors", "\n".join(errors), log)
    finally:
        parent.close("FINISHED" if ok else "FAILED", log)
    log(f"{'all trials finished' if ok else 'some trials did not finish'}; see them with: alcot ui")
    return 0 if ok else 1


def _summary_rows(planned: list[PlannedTrial], outcomes: dict[str, dict]):
    ok = True
    rows = []
    for p in planned:
        d = describe(p.trial)
        if p.action == "skip":
            state = "skipped (finished before)"
            metrics = {
                "run_id": p.run_id,
                "val_ppl": p.metrics.get("val/ppl", ""),
                "flops_realised": p.metrics.get("flops/realised", ""),
            }
        else:
            metrics = outcomes.get(p.trial.hash, {})
            reached = metrics.get("run_id") or metrics.get("owed")
            trained = not metrics.get("error") and bool(reached)
            complete = trained and not metrics.get("owed")
            state = "finished" if complete else ("trained, MLflow behind" if trained else "failed")
            ok &= complete
        rows.append(
            {
                "trial": d["trial"],
                "size": d["size"],
                "method": d["method"],
                "lambda": "" if d["lambda"] is None else d["lambda"],
                "action": p.action,
                "state": state,
                "val_ppl": metrics.get("val_ppl", ""),
                "flops_realised": metrics.get("flops_realised", ""),
                "run_id": metrics.get("run_id", ""),
                "tracking": f"owed: {metrics['owed']}" if metrics.get("owed") else "complete",
                "error": metrics.get("error", ""),
            }
        )
    return rows, ok


def _write_summary(rows: list[dict], parent, log) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    summary = parent.folder / "summary.csv"
    summary.write_text(buf.getvalue())
    parent.log_artifact(summary, log)
    log("summary:")
    owed = 0
    for r in rows:
        ppl = f"{r['val_ppl']:.2f}" if isinstance(r["val_ppl"], float) else "-"
        extra = f"  error: {r['error'][:120]}" if r["error"] else ""
        if r["tracking"] != "complete":
            owed += 1
            extra += f"  MLflow {r['tracking']}"
        log(
            f"  {r['trial']}  {r['size']:6s} {r['method']:9s} lambda={r['lambda']!s:6s} "
            f"{r['state']:26s} val ppl {ppl}{extra}"
        )
    if owed:
        log(
            f"{owed} trials trained but not complete in MLflow (the store was unreachable); "
            "run the sweep again to deliver them (nothing is trained again)"
        )


def _fit(
    sweep: Sweep, todo: list[PlannedTrial], home: Path, parent_id: str, address: str | None, log
) -> dict[str, dict]:
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    from ray import tune

    spec = sweep.spec
    with in_home(home):
        init_ray(address, home, log)
    threads = max(1, int(spec.resources.cpus))
    points = [
        {"trial": p.trial.config.to_dict(), "hash": p.trial.hash, "eval": _eval_section(sweep)}
        for p in todo
    ]
    labels = {p.trial.hash: p.trial.short[:6] for p in todo}
    callback = live_table(lambda config: labels[_point(config)["hash"]], log)
    run_config = tune_run_config("sweep", sweep, parent_id, home, [callback])
    res = spec.resources
    common = dict(home=str(home), parent=parent_id, sweep_id=sweep.sweep_id, threads=threads)
    if res.workers == 1:
        fn, resources, reuse = tune_trainable, {"cpu": res.cpus, "gpu": res.gpus}, True
    else:  # the trial only waits for its Ray Train gang, which holds the resources
        fn, resources, reuse = gang_trainable, {"cpu": 0.01}, False
        common.update(workers=res.workers, cpus=res.cpus, gpus=res.gpus)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(fn, **common), resources),
        param_space={"p": tune.grid_search(points)},
        tune_config=tune.TuneConfig(max_concurrent_trials=spec.max_concurrent, reuse_actors=reuse),
        run_config=run_config,
    )
    with in_home(home):
        results = tuner.fit()
    out: dict[str, dict] = {}
    for r in results:
        h = _point(r.config)["hash"]
        metrics = dict(r.metrics or {})
        if r.error is not None:
            metrics["error"] = error_line(r.error)
        out[h] = metrics
    return out
