"""Optuna search over a sweep's ``search.space``, scheduled by Ray Tune (``OptunaSearch``).

One or more objectives (e.g. validation perplexity and realised training FLOPs, for a Pareto
front); the Optuna study lives in an RDB storage (a sqlite file under ``$ALCOT_HOME/optuna`` by
default) so it can be inspected or continued. Each sampled point becomes a trial exactly like a
grid point: same identity hash, same run folder, same MLflow nesting; a point whose identity
already has a FINISHED run is not trained again.
"""

from __future__ import annotations

import os

from alcot.orchestrator.config import alcot_home, study_slug
from alcot.orchestrator.sweeps.parent_runs import open_parent
from alcot.orchestrator.sweeps.ray_tune import in_home, init_ray, live_table, tune_run_config
from alcot.orchestrator.sweeps.spec import Sweep, make_trial
from alcot.orchestrator.sweeps.trial import RESULT_KEYS, error_line, trial_body


def _key(axis: str) -> str:
    """A dotted config path as a Tune parameter name (Tune reads dots as nesting)."""
    return axis.replace(".", "__")


def _axes(config: dict) -> dict:
    """Tune parameters back to dotted config paths (the inverse of :func:`_key`)."""
    return {k.replace("__", "."): v for k, v in config.items()}


def tune_space(space: dict) -> dict:
    from ray import tune

    out = {}
    for axis, d in space.items():
        if "choices" in d:
            out[_key(axis)] = tune.choice(d["choices"])
        elif d.get("int"):
            out[_key(axis)] = tune.randint(int(d["low"]), int(d["high"]) + 1)
        elif d.get("log"):
            out[_key(axis)] = tune.loguniform(d["low"], d["high"])
        else:
            out[_key(axis)] = tune.uniform(d["low"], d["high"])
    return out


def search_trainable(config: dict, sweep: Sweep, home: str, parent: str, threads: int) -> None:
    from ray import tune

    trial = make_trial(sweep.spec, sweep.base, _axes(config), sweep.path, sweep.lines)
    tags = {
        "mlflow.parentRunId": parent,
        "alcot.sweep_id": sweep.sweep_id,
        "alcot.trial": trial.hash,
    }
    section = None if sweep.spec.eval is None else sweep.spec.eval.resolved(sweep.path.parent)
    result = trial_body(trial.config.to_dict(), home, tags, threads, eval_section=section)
    tune.report({**result, "trial_hash": trial.hash})


def _sampler(name: str, seed: int, space: dict):
    import optuna

    if name == "grid":  # every point once, also under concurrent asking: Optuna's grid sampler
        # skips the points of trials still running (the sweep file was checked: choices only)
        grid = {_key(axis): list(d["choices"]) for axis, d in space.items()}
        return optuna.samplers.GridSampler(grid, seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def run_search(sweep: Sweep, address: str | None, dry_run: bool, log) -> int:
    spec, search = sweep.spec, sweep.spec.search
    home = alcot_home()
    log(
        f"search {sweep.sweep_id} of study {spec.study!r}: {search.trials} Optuna trials "
        f"({search.sampler}) over {', '.join(search.space)}; objectives: "
        + ", ".join(f"{o.direction} {o.metric}" for o in search.objectives)
    )
    if dry_run:
        return 0
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    import optuna
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    parent = open_parent(sweep, home, "search", log)
    parent_id = parent.run_id
    storage_url = search.storage
    if storage_url is None:
        (home / "optuna").mkdir(parents=True, exist_ok=True)
        storage_url = f"sqlite:///{home / 'optuna' / (study_slug(spec.study) + '.db')}"
    metrics = [RESULT_KEYS[o.metric] for o in search.objectives]
    modes = ["min" if o.direction == "minimize" else "max" for o in search.objectives]
    algo = OptunaSearch(
        space=None,
        metric=metrics if len(metrics) > 1 else metrics[0],
        mode=modes if len(modes) > 1 else modes[0],
        sampler=_sampler(search.sampler, search.seed, search.space),
        study_name=f"{spec.study}-{sweep.sweep_id}",
        storage=optuna.storages.RDBStorage(storage_url),
    )
    with in_home(home):
        init_ray(address, home, log)
    trainable = tune.with_resources(
        tune.with_parameters(
            search_trainable,
            sweep=sweep,
            home=str(home),
            parent=parent_id,
            threads=max(1, int(spec.resources.cpus)),
        ),
        {"cpu": spec.resources.cpus, "gpu": spec.resources.gpus},
    )
    tuner = tune.Tuner(
        trainable,
        param_space=tune_space(search.space),
        tune_config=tune.TuneConfig(
            search_alg=ConcurrencyLimiter(algo, max_concurrent=spec.max_concurrent),
            num_samples=search.trials,
            reuse_actors=True,
        ),
        run_config=tune_run_config(
            "search", sweep, parent_id, home, [live_table(lambda c: _label(c), log)]
        ),
    )
    ok = False
    try:
        with in_home(home):
            results = tuner.fit()
        ok = _report_search(results, metrics, storage_url, spec, sweep, log)
    finally:
        parent.close("FINISHED" if ok else "FAILED", log)
    return 0 if ok else 1


def _label(config: dict) -> str:
    return ",".join(
        f"{k.rsplit('__', 1)[-1]}={v:.3g}" if isinstance(v, float) else f"{v}"
        for k, v in config.items()
    )


def _report_search(results, metrics, storage_url, spec, sweep, log) -> bool:
    import optuna

    ok = True
    log("trials:")
    for r in results:
        cfg = _axes(r.config)
        if r.error is not None:
            ok = False
            log(f"  {cfg}  failed: {error_line(r.error)}")
        else:
            shown = ", ".join(f"{m}={r.metrics.get(m, float('nan')):.4g}" for m in metrics)
            log(f"  {cfg}  {shown}")
    study = optuna.load_study(study_name=f"{spec.study}-{sweep.sweep_id}", storage=storage_url)
    best = study.best_trials if len(metrics) > 1 else [study.best_trial]
    log(
        f"Optuna study {study.study_name} in {storage_url}: {len(study.trials)} trials, "
        f"{len(best)} on the {'Pareto front' if len(metrics) > 1 else 'best'}"
    )
    return ok
