"""One sweep trial as it runs inside a Ray worker: config in, metrics out.

Shared by grid sweeps (``runner``) and Optuna searches (``search``). The trial's own log goes to
``<run dir>/trial.log``; the lines a person must see (tracking trouble, waiting for another
invocation, a trial found finished) come back in the result's ``notes``, and what MLflow still
lacks in ``owed``, so that the driver's live table and summary can show them.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from alcot.orchestrator.config import run_dir
from alcot.orchestrator.tracking.run_folder import last_metrics, read_record

# What a trial reports to Tune: run metric -> result key (also the Optuna objectives' names).
RESULT_KEYS = {
    "val/loss": "val_loss",
    "val/ppl": "val_ppl",
    "val/mean_depth": "val_mean_depth",
    "train/loss": "train_loss",
    "flops/realised": "flops_realised",
    "flops/nominal": "flops_nominal",
}

# Trial log lines that also go to the driver's screen.
_NOTEWORTHY = ("warning", "in use by", "already trained", "not in ", "was tracked in", "retry")

MAX_RETRY_DELAY = 30.0


def report(
    metrics: dict[str, float], step: int, run_id: str, notes=(), owed: str = ""
) -> dict[str, Any]:
    out: dict[str, Any] = {v: metrics.get(k, float("nan")) for k, v in RESULT_KEYS.items()}
    return {**out, "step": step, "run_id": run_id, "notes": " | ".join(notes), "owed": owed}


def trial_config(trial_cfg: dict):
    """The RunConfig of a planned trial (its vocabulary is derived from the tokenizer again)."""
    from alcot.orchestrator.config import RunConfig

    cfg_dict = {**trial_cfg, "model": dict(trial_cfg["model"])}
    cfg_dict["model"].pop("vocab_size", None)
    return RunConfig.from_dict(cfg_dict)


class TrialLog:
    """``log`` for a trial: every line to ``trial.log``, noteworthy ones kept for the driver."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "trial.log"
        self.notes: list[str] = []

    def __call__(self, *parts) -> None:
        line = " ".join(str(p) for p in parts)
        with open(self.path, "a") as f:
            f.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {line}\n")
        if any(word in line for word in _NOTEWORTHY):
            self.notes.append(line)


def backoff(folder: Path, tags: dict, log) -> None:
    """Before a retry of the trial in the same sweep invocation, wait (see _retry_delay)."""
    delay = _retry_delay(folder, tags.get("mlflow.parentRunId", "-"))
    if delay:
        log(f"retry of this trial after {delay:.0f} s")
        time.sleep(delay)


def _retry_delay(folder: Path, attempt_key: str) -> float:
    """Count this sweep invocation's attempts at the trial; a retry waits 1, 2, 4 ... seconds
    (at most MAX_RETRY_DELAY), so that a trial failing for a passing reason does not burn its
    retries within a second."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "attempts.json"
    try:
        attempts = json.loads(path.read_text())
    except (OSError, ValueError):
        attempts = {}
    n = attempts.get(attempt_key, 0)
    attempts[attempt_key] = n + 1
    path.write_text(json.dumps(attempts))
    return 0.0 if n == 0 else min(MAX_RETRY_DELAY, 2.0 ** (n - 1))


def trial_body(
    trial_cfg: dict,
    home: str,
    extra_tags: dict,
    threads: int,
    lease: bool = True,
    eval_section: dict | None = None,
) -> dict[str, Any]:
    """One training run (claimed, resumed, delivered as ``run_training`` does), metrics back;
    then the sweep's ``eval:`` section, if any (skipped when its result is in the folder)."""
    os.environ["ALCOT_HOME"] = home
    import torch

    from alcot.orchestrator.training_run import run_training

    if threads:
        torch.set_num_threads(threads)
    cfg = trial_config(trial_cfg)
    folder = run_dir(cfg, Path(home))
    log = TrialLog(folder)
    if lease:  # a gang's workers (lease=False) leave this to the gang's own process
        backoff(folder, extra_tags, log)
    outcome = run_training(cfg, progress=False, log=log, extra_tags=extra_tags, lease=lease)
    res = outcome.result
    if res.status != "finished":
        raise RuntimeError(res.message)
    if eval_section and lease:  # gang workers (lease=False): the gang's process evaluates
        from alcot.orchestrator.evaluation.results import evaluate_trial

        evaluate_trial(outcome.out_dir, eval_section, log=log)
    journalled, _ = last_metrics(outcome.out_dir)
    owed = "" if outcome.all_metrics_sent else outcome.owed.describe()
    return report({**journalled, **res.metrics}, res.step, outcome.run_id or "", log.notes, owed)


def results_from_run_dir(trial_cfg: dict, home: str) -> dict[str, Any]:
    """A finished run's final metrics, read back from its folder (journal and tracking record)
    by the driver-side process of a gang trial."""
    folder = run_dir(trial_config(trial_cfg), Path(home))
    last, step = last_metrics(folder)
    record = read_record(folder)
    return report(last, step, (record or {}).get("run_id") or "")


def error_line(err: BaseException) -> str:
    """The last line of a trial's error (Ray wraps the trial's traceback around it)."""
    text = str(err).strip()
    return text.splitlines()[-1] if text else "error"
