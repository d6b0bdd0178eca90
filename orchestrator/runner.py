"""Run a sweep on Ray Tune: plan, skip finished trials, resume unfinished ones, track in MLflow.

The driver starts an embedded local Ray (or joins ``--address``), opens a parent MLflow run for
this invocation, and lets Tune schedule one trial per planned config with ``max_concurrent``
at a time and ``retries`` retries. A trial is ``run_training`` on its config: it resumes from its
own checkpoints when it has some, so a retried, resubmitted or driver-killed trial continues
where it stopped and into the same MLflow run. Trials with a FINISHED MLflow run of the same
identity are skipped. Trials of several workers (tensor x data parallel) run under Ray Train's
``TorchTrainer``, which places them as a gang and sets up torch.distributed across them.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alcot.model import checkpoints

from .config import alcot_home, run_dir
from .sweep import Sweep, Trial, describe
from .tracking import ensure_experiment, read_journal, read_record, resolve_uri


@dataclass
class PlannedTrial:
    trial: Trial
    action: str  # run | resume | skip
    run_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # a skipped trial's final metrics


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def open_parent_run(sweep: Sweep, home: Path, kind: str) -> tuple[Any, str]:
    """(MLflow client, id of a new parent run for this invocation of the sweep)."""
    uri, artifact_root = resolve_uri(sweep.spec.tracking_uri, home)
    client = _client(uri)
    exp_id = ensure_experiment(client, sweep.spec.study, artifact_root)
    parent = client.create_run(
        exp_id,
        run_name=f"{kind}-{sweep.sweep_id}",
        tags={"alcot.sweep_id": sweep.sweep_id, "alcot.kind": kind},
    )
    return client, parent.info.run_id


def plan(sweep: Sweep, home: Path | None = None) -> list[PlannedTrial]:
    """What each trial will do: skip (a FINISHED run exists), resume (checkpoints), or run."""
    home = home or alcot_home()
    uri, artifact_root = resolve_uri(sweep.spec.tracking_uri, home)
    fresh_store = uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).exists()
    client = None if fresh_store else _client(uri)  # a dry run must not create the store
    exp = client.get_experiment_by_name(sweep.spec.study) if client else None
    out = []
    for t in sweep.trials:
        if exp is not None:
            done = client.search_runs(
                [exp.experiment_id],
                filter_string=f"tags.config_hash = '{t.hash}' and attributes.status = 'FINISHED'",
                max_results=1,
            )
            if done:
                out.append(PlannedTrial(t, "skip", done[0].info.run_id, done[0].data.metrics))
                continue
        info = checkpoints.latest_valid(run_dir(t.config, home) / "checkpoints")
        out.append(
            PlannedTrial(
                t, "resume" if info else "run", info.meta.get("mlflow_run_id") if info else None
            )
        )
    return out


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
# What a trial reports to Tune: run metric -> result key (also the Optuna objectives' names).
RESULT_KEYS = {
    "val/loss": "val_loss",
    "val/ppl": "val_ppl",
    "val/mean_depth": "val_mean_depth",
    "train/loss": "train_loss",
    "flops/realised": "flops_realised",
    "flops/nominal": "flops_nominal",
}


def _report(metrics: dict[str, float], step: int, run_id: str) -> dict[str, Any]:
    out: dict[str, Any] = {v: metrics.get(k, float("nan")) for k, v in RESULT_KEYS.items()}
    return {**out, "step": step, "run_id": run_id}


def _trial_config(trial_cfg: dict):
    """The RunConfig of a planned trial (its vocabulary is derived from the tokenizer again)."""
    from .config import RunConfig

    cfg_dict = {**trial_cfg, "model": dict(trial_cfg["model"])}
    cfg_dict["model"].pop("vocab_size", None)
    return RunConfig.from_dict(cfg_dict)


def _trial_body(trial_cfg: dict, home: str, extra_tags: dict, threads: int) -> dict[str, Any]:
    """Runs inside a Ray worker: one training run, metrics back to Tune."""
    os.environ["ALCOT_HOME"] = home
    import torch

    from .train import run_training

    if threads:
        torch.set_num_threads(threads)
    cfg = _trial_config(trial_cfg)
    outcome = run_training(cfg, progress=False, log=lambda *a: None, extra_tags=extra_tags)
    res = outcome.result
    if res.status != "finished":
        raise RuntimeError(res.message)
    return _report(res.metrics, res.step, outcome.run_id or "")


def _results_from_run_dir(trial_cfg: dict, home: str) -> dict[str, Any]:
    """A finished run's final metrics, read back from its folder (journal and tracking record)."""
    folder = run_dir(_trial_config(trial_cfg), Path(home))
    last: dict[str, float] = {}
    step = 0
    for row in read_journal(folder):
        last.update(row["metrics"])
        step = row["step"]
    record = read_record(folder)
    return _report(last, step, record["run_id"] if record else "")


def tune_trainable(config: dict, home: str, parent: str, sweep_id: str, threads: int) -> None:
    from ray import tune

    p = config["p"]
    tags = {"mlflow.parentRunId": parent, "alcot.sweep_id": sweep_id, "alcot.trial": p["hash"]}
    tune.report(_trial_body(p["trial"], home, tags, threads))


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
    torch.distributed across them; each runs the same training (tensor x data parallel)."""
    from ray import train, tune
    from ray.train.torch import TorchConfig, TorchTrainer

    point = {
        **config["p"],
        "home": home,
        "parent": parent,
        "sweep_id": sweep_id,
        "threads": threads,
    }
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
    trainer.fit()  # raises if a worker failed
    tune.report(_results_from_run_dir(point["trial"], home))


def train_worker_loop(config: dict) -> None:
    """Per-worker loop of a multi-worker trial under Ray Train (torch.distributed is set up);
    rank 0 tracks, and the driver reads the results back from the run folder."""
    tags = {
        "mlflow.parentRunId": config["parent"],
        "alcot.sweep_id": config["sweep_id"],
        "alcot.trial": config["hash"],
    }
    _trial_body(config["trial"], config["home"], tags, config["threads"])


# ------------------------------------------------------------------------------ live table
def _live_callback(labels: dict[str, str], log):
    from ray.tune import Callback

    class LiveTable(Callback):
        """Prints the trials' states whenever one changes."""

        def __init__(self):
            self.states: dict[str, str] = {h: "pending" for h in labels}

        def _show(self):
            line = "  ".join(f"{labels[h]}:{s}" for h, s in self.states.items())
            log(f"[{time.strftime('%H:%M:%S')}] {line}")

        def _mark(self, trial, state: str) -> None:
            self.states[_point(trial.config)["hash"]] = state
            self._show()

        def on_trial_start(self, iteration, trials, trial, **info):
            self._mark(trial, "running")

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._mark(trial, "finished")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._mark(trial, "failed")

        def on_trial_recover(self, iteration, trials, trial, **info):
            self._mark(trial, "retrying")

    return LiveTable()


@contextlib.contextmanager
def in_home(home: Path):
    """Run the Ray driver with ALCOT_HOME as its working directory.

    Under a Ray Job the working directory is a runtime-env package that Ray may delete while the
    driver still runs (seen with two nodes on one machine, whose runtime-env agents share a
    temp folder), and Tune resolves paths against the working directory. ALCOT_HOME is ours;
    everything the driver reads was loaded before, by absolute path.
    """
    try:
        before = os.getcwd()
    except FileNotFoundError:
        before = None
    home.mkdir(parents=True, exist_ok=True)
    os.chdir(home)
    try:
        yield
    finally:
        if before and os.path.isdir(before):
            os.chdir(before)


def _point(config: dict) -> dict:
    """The planned point inside a Tune trial's config."""
    return config["p"]


def init_ray(address: str | None, home: Path, log) -> None:
    import ray

    if ray.is_initialized():
        return
    env = {"ALCOT_HOME": str(home)}
    if os.environ.get("MLFLOW_TRACKING_URI"):
        env["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_TRACKING_URI"]
    kwargs: dict[str, Any] = {"log_to_driver": False}
    # Inside a Ray Job (`alcot sweep submit`) the job's runtime env already carries the working
    # directory and these variables to every worker; a second runtime env would replace it.
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:
        kwargs["runtime_env"] = {"env_vars": env}
    if address:
        kwargs["address"] = address
    else:
        kwargs.update(
            include_dashboard=False, _temp_dir=str(Path("/tmp") / f"ray-alcot-{os.getuid()}")
        )
    for attempt in (1, 2):  # a known Ray start-up race: one retry
        try:
            ray.init(**kwargs)
            return
        except Exception as err:  # pragma: no cover - depends on the machine
            if attempt == 2:
                raise
            log(f"ray.init failed ({err}); retrying once")
            time.sleep(2)


def run_sweep(sweep: Sweep, address: str | None = None, dry_run: bool = False, log=print) -> int:
    """Plan and (unless ``dry_run``) run the sweep. Returns the exit code: 0 if every trial ended
    finished (or was already), 1 otherwise."""
    home = alcot_home()
    spec = sweep.spec
    if spec.search is not None:
        from .search import run_search

        return run_search(sweep, address, dry_run, log)
    planned = plan(sweep, home)
    log(f"sweep {sweep.sweep_id} of study {spec.study!r}: {len(planned)} trials")
    log(plan_table(planned))
    if dry_run:
        return 0
    todo = [p for p in planned if p.action != "skip"]
    client, parent_id = open_parent_run(sweep, home, "sweep")
    sweep_copy = home / "sweeps" / parent_id / sweep.path.name
    sweep_copy.parent.mkdir(parents=True, exist_ok=True)
    sweep_copy.write_text(sweep.text)
    client.log_artifact(parent_id, str(sweep_copy))
    log(f"MLflow parent run {parent_id} (experiment {spec.study!r})")

    outcomes: dict[str, dict] = {}
    if todo:
        outcomes = _fit(sweep, todo, home, parent_id, address, log)
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
            state = "finished" if metrics.get("run_id") and not metrics.get("error") else "failed"
            ok &= state == "finished"
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
                "error": metrics.get("error", ""),
            }
        )
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    summary = sweep_copy.parent / "summary.csv"
    summary.write_text(buf.getvalue())
    client.log_artifact(parent_id, str(summary))
    client.set_terminated(parent_id, status="FINISHED" if ok else "FAILED")
    log("summary:")
    for r in rows:
        ppl = f"{r['val_ppl']:.2f}" if isinstance(r["val_ppl"], float) else "-"
        extra = f"  error: {r['error'][:120]}" if r["error"] else ""
        log(
            f"  {r['trial']}  {r['size']:6s} {r['method']:9s} lambda={r['lambda']!s:6s} "
            f"{r['state']:26s} val ppl {ppl}{extra}"
        )
    log(f"{'all trials finished' if ok else 'some trials failed'}; see them with: alcot ui")
    return 0 if ok else 1


def tune_run_config(kind: str, sweep: Sweep, parent_id: str, home: Path, callbacks=()):
    """The Ray Tune run settings a sweep (``kind`` sweep) or a search shares: results under
    ``$ALCOT_HOME/ray_results``, the sweep's retry budget, no Tune console tables."""
    from ray import tune

    return tune.RunConfig(
        name=f"{kind}-{sweep.sweep_id}-{parent_id[:8]}",
        storage_path=str(home / "ray_results"),
        failure_config=tune.FailureConfig(max_failures=sweep.spec.retries),
        callbacks=list(callbacks),
        verbose=0,
    )


def error_line(err: BaseException) -> str:
    """The last line of a trial's error (Ray wraps the trial's traceback around it)."""
    text = str(err).strip()
    return text.splitlines()[-1] if text else "error"


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
    points = [{"trial": p.trial.config.to_dict(), "hash": p.trial.hash} for p in todo]
    labels = {p.trial.hash: p.trial.short[:6] for p in todo}
    run_config = tune_run_config("sweep", sweep, parent_id, home, [_live_callback(labels, log)])
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
