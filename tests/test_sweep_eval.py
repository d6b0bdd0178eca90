"""A sweep's ``eval:`` section: each trial is evaluated after its training, as part of the
trial; a resubmitted sweep finds the evaluation done and runs nothing again."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

SWEEP = """
study: evalsweep
base:
  seed: 0
  model: {size: micro, method: adaptive, l_max: 2}
  data: {builtin_documents: 300, vocab_size: 384, seq_len: 32}
  train: {batch_size: 8, lr: 0.01, steps: 12, eval_every: 1000, eval_batches: 2,
          checkpoint_every: 6}
  tracking: {flush_seconds: 0.2}
grid:
  model.halting.lambda: [0.01]
eval:
  texts: [story.txt]
  tau: [0.05, 0.5]
resources: {cpus: 1}
max_concurrent: 1
"""


def sweep(path: Path, home: Path):
    env = dict(os.environ, ALCOT_HOME=str(home))
    return subprocess.run(
        [str(BIN / "alcot"), "sweep", "run", str(path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_plan_and_trial_without_ray(tmp_path):
    """The planner and the trial body: a trial is trained and evaluated once, then skipped; a
    new eval section evaluates the finished trial again without training it."""
    from conftest import home_at

    from alcot.orchestrator.sweeps.runner import plan
    from alcot.orchestrator.sweeps.spec import load_sweep
    from alcot.orchestrator.sweeps.trial import trial_body

    home = tmp_path / "home"
    path = tmp_path / "sweep.yaml"
    path.write_text(textwrap.dedent(SWEEP))
    (tmp_path / "story.txt").write_text("Ivy went to the library with 5 green pens. " * 8)
    with home_at(home):
        sweep = load_sweep(path)
        (p,) = plan(sweep, home, log=lambda *a: None)
        assert p.action == "run"
        section = sweep.spec.eval.resolved(path.parent)
        first = trial_body(p.trial.config.to_dict(), str(home), {}, 1, eval_section=section)
        folder = next((home / "runs" / "evalsweep").iterdir())
        assert len(list(folder.glob("eval/*.json"))) == 1
        (p,) = plan(sweep, home, log=lambda *a: None)
        assert p.action == "skip"

        path.write_text(textwrap.dedent(SWEEP).replace("tau: [0.05, 0.5]", "tau: [0.2]"))
        sweep = load_sweep(path)
        (p,) = plan(sweep, home, log=lambda *a: None)
        assert p.action == "evaluate"
        section = sweep.spec.eval.resolved(path.parent)
        again = trial_body(p.trial.config.to_dict(), str(home), {}, 1, eval_section=section)
        assert again["run_id"] == first["run_id"] and again["step"] == first["step"]
        assert "already trained" in again["notes"]
        assert len(list(folder.glob("eval/*.json"))) == 2
        (p,) = plan(sweep, home, log=lambda *a: None)
        assert p.action == "skip"


@pytest.mark.slow
def test_eval_section_runs_once_and_is_skipped_on_resubmission(tmp_path):
    from alcot.orchestrator.tracking.stores import open_client

    home = tmp_path / "home"
    path = tmp_path / "sweep.yaml"
    path.write_text(textwrap.dedent(SWEEP))
    (tmp_path / "story.txt").write_text("Ivy went to the library with 5 green pens. " * 8)

    first = sweep(path, home)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    results = list((home / "runs" / "evalsweep").glob("*/eval/*.json"))
    assert len(results) == 1
    res = json.loads(results[0].read_text())
    assert [(b["tau"], b["l_max"]) for b in res["budgets"]] == [(0.05, 2), (0.5, 2)]
    client = open_client(f"sqlite:///{home / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "evalsweep"]
    (child,) = [
        r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags
    ]
    keys = set(child.data.metrics)
    assert "eval/budget/tau_0.05_lmax_2/story/ppl" in keys
    assert "eval/budget/tau_0.5_lmax_2/flops_per_token" in keys

    again = sweep(path, home)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "skip" in again.stdout
    assert len(list((home / "runs" / "evalsweep").glob("*/eval/*.json"))) == 1
