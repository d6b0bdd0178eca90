"""Driver-side Ray and Tune plumbing shared by grid sweeps and Optuna searches: starting or
joining Ray, Tune's run settings, and the live table of trial states."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any


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


def init_ray(address: str | None, home: Path, log) -> None:
    import ray

    if ray.is_initialized():
        return
    env = {"ALCOT_HOME": str(home)}
    for var in ("MLFLOW_TRACKING_URI", "ALCOT_LEASE_TTL", "ALCOT_TRACKING_PATIENCE"):
        if os.environ.get(var):
            env[var] = os.environ[var]
    kwargs: dict[str, Any] = {"log_to_driver": False}
    # Inside a Ray Job (`alcot sweep submit`) the job's runtime env already carries the working
    # directory and these variables to every worker; a second runtime env would replace it.
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:
        kwargs["runtime_env"] = {"env_vars": env}
    if address:
        kwargs["address"] = address
    else:
        # Ray prestarts a worker per CPU for the first driver, without a runtime env; every
        # task of a sweep carries one (the variables above), so those workers are never used,
        # and each costs about a CPU-second to start and more while it idles. The raylet this
        # call starts reads the setting from the environment it inherits.
        os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
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


def tune_run_config(kind: str, sweep, parent_id: str, home: Path, callbacks=()):
    """The Ray Tune run settings a sweep (``kind`` sweep) or a search shares: results under
    ``$ALCOT_HOME/ray_results``, the sweep's retry budget, no Tune console tables."""
    from ray import tune

    # No CSV, JSON or TensorBoard result files of Tune's own: each trial's metrics are in its
    # run folder's journal and in MLflow, and the TensorBoard logger alone imported torch into
    # the driver (about a CPU-second per sweep invocation).
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    return tune.RunConfig(
        name=f"{kind}-{sweep.sweep_id}-{parent_id[:8]}",
        storage_path=str(home / "ray_results"),
        failure_config=tune.FailureConfig(max_failures=sweep.spec.retries),
        callbacks=list(callbacks),
        verbose=0,
    )


def live_table(label_of, log):
    """A Tune callback printing the trials' states whenever one changes, and the notes a trial
    brings back (tracking trouble, waiting for another invocation, what MLflow still lacks).
    ``label_of(trial_config)`` names a trial in the table."""
    from ray.tune import Callback

    class LiveTable(Callback):
        def __init__(self):
            self.states: dict[str, str] = {}

        def _mark(self, trial, state: str) -> None:
            label = label_of(trial.config)
            self.states[label] = state
            line = "  ".join(f"{k}:{s}" for k, s in self.states.items())
            log(f"[{time.strftime('%H:%M:%S')}] {line}")

        def on_trial_start(self, iteration, trials, trial, **info):
            self._mark(trial, "running")

        def on_trial_complete(self, iteration, trials, trial, **info):
            result = trial.last_result or {}
            self._mark(trial, "finished" + (" (tracking owed)" if result.get("owed") else ""))
            label = label_of(trial.config)
            for note in filter(None, str(result.get("notes", "")).split(" | ")):
                log(f"  {label}: {note[:300]}")
            if result.get("owed"):
                log(f"  {label}: not yet in MLflow: {result['owed']}")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._mark(trial, "failed")

        def on_trial_recover(self, iteration, trials, trial, **info):
            self._mark(trial, "retrying")

    return LiveTable()
