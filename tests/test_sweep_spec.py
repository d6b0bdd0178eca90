"""Sweep files: expansion, identities, budgets, the dry-run plan, and malformed files."""

import itertools
import textwrap
from pathlib import Path

import pytest

from alcot.orchestrator.cli import main
from alcot.orchestrator.sweeps.spec import SweepError, load_sweep

ROOT = Path(__file__).resolve().parents[1]


BASE = f"base: {ROOT / 'configs' / 'train_adaptive.yaml'}\n"


def write(tmp_path: Path, body: str, name: str = "sweep.yaml", base: bool = True) -> Path:
    path = tmp_path / name
    path.write_text((BASE if base else "") + textwrap.dedent(body).lstrip("\n"))
    return path


def test_quickstart_expands_with_vanilla_deduplicated():
    sweep = load_sweep(ROOT / "sweeps" / "quickstart.yaml")
    combos = [
        (t.config.model.size, t.config.model.method, t.config.model.halting.lambda_)
        for t in sweep.trials
    ]
    assert len(combos) == 6  # 2 sizes x (2 adaptive + 1 vanilla), not 2 x 4
    assert sorted(c for c in combos if c[1] == "vanilla") == [
        ("micro", "vanilla", 0.01),
        ("tiny", "vanilla", 0.01),
    ]  # halting reset to defaults
    assert len({t.hash for t in sweep.trials}) == 6
    assert all(t.config.tracking.experiment == "quickstart" for t in sweep.trials)
    assert all(t.tokens >= 65536 for t in sweep.trials)


def test_dry_run_prints_the_plan_and_launches_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ALCOT_HOME", str(tmp_path / "home"))
    assert main(["sweep", "run", str(ROOT / "sweeps" / "quickstart.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.strip()]
    header = next(i for i, line in enumerate(lines) if line.startswith("trial"))
    rows = lines[header + 1 : header + 7]
    assert len(rows) == 6
    for row in rows:
        cells = row.split()
        assert len(cells[0]) == 10 and cells[1] in ("micro", "tiny")
        assert cells[2].endswith("M") and cells[3] in ("adaptive", "vanilla")
        assert float(cells[6]) > 0 and cells[7] == "run"
    assert not (tmp_path / "home" / "runs").exists()
    assert not (tmp_path / "home" / "mlflow.db").exists()
    import ray

    assert not ray.is_initialized()


def test_changing_one_axis_value_adds_only_new_trials(tmp_path):
    a = write(
        tmp_path,
        """
        study: s
        grid: {model.halting.lambda: [0.01, 0.1], model.size: [micro]}
        budget: {tokens: 4096}
    """,
        "a.yaml",
    )
    b = write(
        tmp_path,
        """
        study: s
        grid: {model.halting.lambda: [0.01, 0.3], model.size: [micro]}
        budget: {tokens: 4096}
    """,
        "b.yaml",
    )
    ha = {t.hash for t in load_sweep(a).trials}
    hb = {t.hash for t in load_sweep(b).trials}
    assert len(ha & hb) == 1 and len(hb - ha) == 1


def test_isoflop_budget_gives_small_models_more_tokens(tmp_path):
    path = write(
        tmp_path,
        """
        study: s
        grid: {model.size: [micro, tiny]}
        budget: {flops: 1.0e12}
    """,
    )
    trials = {t.config.model.size: t for t in load_sweep(path).trials}
    assert trials["micro"].tokens > 3 * trials["tiny"].tokens
    for t in trials.values():
        assert t.est_flops == pytest.approx(1.0e12, rel=0.05)


def test_isoflop_budget_plans_mixture_of_recursions_by_its_capacities(tmp_path):
    """Expert choice runs a known share of tokens at each recursion (3/4, 2/4, 1/4 by default):
    a budget buys it the tokens of 2.5 passes per token, not 4."""
    path = write(
        tmp_path,
        """
        study: s
        grid: {model.method: [mor, fixed]}
        budget: {flops: 1.0e12}
    """,
    )
    trials = {t.config.model.method: t for t in load_sweep(path).trials}
    assert trials["mor"].config.model.planned_passes == 2.5
    assert trials["mor"].tokens == pytest.approx(trials["fixed"].tokens * 4 / 2.5, rel=0.05)


def test_budget_per_trial_from_zip_include_and_overrides(tmp_path):
    """A budget per size (zipped with model.size), extra points by ``include`` with their own
    budget, and an override's budget: each replaces the sweep's ``budget`` for its trials."""
    path = write(
        tmp_path,
        """
        study: s
        grid: {model.method: [vanilla, fixed]}
        zip: {model.size: [micro, tiny], budget.flops: [1.0e+11, 1.0e+12]}
        include:
          - {model.size: micro, model.method: vanilla, model.num_layers: 8, budget.flops: 1.0e+11}
          - {model.size: micro, model.method: vanilla, budget.tokens: 4096}
          - {model.size: micro, model.method: fixed, seed: 3}
        overrides:
          - when: {seed: 3}
            set: {budget.flops: 2.0e+11}
        budget: {flops: 5.0e+12}
    """,
    )
    trials = load_sweep(path).trials
    assert len(trials) == 7
    by_tokens = [t for t in trials if t.tokens == 4096]
    assert len(by_tokens) == 1 and by_tokens[0].config.model.method == "vanilla"
    got = {}
    for t in trials:
        if t is by_tokens[0]:
            continue
        m = t.config.model
        got[(m.size, m.method, m.num_layers, t.config.seed)] = t
        want = 2.0e11 if t.config.seed == 3 else 1.0e11 if m.size == "micro" else 1.0e12
        assert t.est_flops == pytest.approx(want, rel=0.05), (m.size, m.method, t.config.seed)
    assert len(got) == 6
    deep = got[("micro", "vanilla", 8, 0)]
    four_pass = got[("micro", "fixed", 2, 0)]
    assert deep.tokens == pytest.approx(four_pass.tokens, rel=0.05)  # 4x layers = 4 passes


@pytest.mark.parametrize(
    "body, field",
    [
        ("grid: {model.size: [micro]}\ninclude:\n  - {budget.steps: 3}\n", "budget.steps"),
        ("grid: {model.size: [micro]}\ninclude:\n  - {budget.flops: -1.0}\n", "budget.flops"),
        ("grid: {model.size: [micro]}\ninclude:\n  - {}\n", "include[0]"),
        ("include:\n  - {model.sise: micro}\n", "include[0].model.sise"),
    ],
)
def test_bad_include_entries_and_budgets_are_rejected(body, field, tmp_path):
    path = write(tmp_path, "study: s\n" + body)
    with pytest.raises(SweepError) as err:
        load_sweep(path)
    assert field in str(err.value), err.value


def test_zip_and_overrides(tmp_path):
    path = write(
        tmp_path,
        """
        study: s
        grid: {model.method: [adaptive, vanilla]}
        zip: {train.lr: [0.003, 0.002], train.batch_size: [8, 16]}
        overrides:
          - when: {model.method: vanilla}
            set: {train.warmup_frac: 0.1}
    """,
    )
    trials = load_sweep(path).trials
    assert len(trials) == 4
    pairs = {(t.config.train.lr, t.config.train.batch_size) for t in trials}
    assert pairs == {(0.003, 8), (0.002, 16)}
    for t in trials:
        assert t.config.train.warmup_frac == (0.1 if t.config.model.method == "vanilla" else 0.02)


MALFORMED = {
    "unknown_key": ("study: s\ngrid: {model.size: [micro]}\nworkers: 3\n", "workers", 3),
    "wrong_type": (
        "study: s\ngrid: {model.size: [micro]}\nmax_concurrent: two\n",
        "max_concurrent",
        3,
    ),
    "empty_grid": ("study: s\ngrid: {}\n", "grid", 2),
    "axis_not_a_path": ("study: s\ngrid:\n  model.sise: [micro]\n", "grid.model.sise", 3),
    "size_not_in_ladder": ("study: s\ngrid:\n  model.size: [micro, huge]\n", "grid.model.size", 3),
    "tp_not_dividing_heads": (
        "study: s\ngrid: {model.size: [micro]}\nresources:\n  tensor_parallel: 3\n",
        "resources.tensor_parallel",
        4,
    ),
    "pp_not_dividing_layers": (
        "study: s\ngrid: {model.size: [micro]}\nresources:\n  pipeline_parallel: 3\n",
        "resources.pipeline_parallel",
        4,
    ),
    "pp_zero": (
        "study: s\ngrid: {model.size: [micro]}\nresources:\n  pipeline_parallel: 0\n",
        "resources.pipeline_parallel",
        4,
    ),
    "negative_budget": (
        "study: s\ngrid: {model.size: [micro]}\nbudget:\n  tokens: -5\n",
        "budget.tokens",
        4,
    ),
    "bad_objective": (
        "study: s\nsearch:\n  objectives:\n    - {metric: accuracy}\n"
        "  space: {model.halting.lambda: {low: 0.01, high: 1}}\n",
        "search.objectives[0].metric",
        4,
    ),
    "bad_direction": (
        "study: s\nsearch:\n  objectives:\n    - {metric: val/ppl, direction: up}\n"
        "  space: {model.halting.lambda: {low: 0.01, high: 1}}\n",
        "search.objectives[0].direction",
        4,
    ),
    "axis_not_a_list": ("study: s\ngrid:\n  model.size: micro\n", "grid.model.size", 3),
    "empty_axis": ("study: s\ngrid:\n  model.size: []\n", "grid.model.size", 3),
    "zip_lengths": ("study: s\nzip:\n  train.lr: [0.1, 0.2]\n  train.batch_size: [8]\n", "zip", 3),
    "both_budgets": (
        "study: s\ngrid: {model.size: [micro]}\nbudget:\n  tokens: 5\n  flops: 1.0e9\n",
        "budget.tokens",
        4,
    ),
    "negative_retries": ("study: s\ngrid: {model.size: [micro]}\nretries: -1\n", "retries", 3),
    "bad_space_bounds": (
        "study: s\nsearch:\n  space:\n    model.halting.lambda: {low: 1.0, high: 0.1}\n",
        "search.space.model.halting.lambda",
        4,
    ),
    "bad_value_on_axis": (
        "study: s\ngrid:\n  model.halting.tau: [0.1, 1.5]\n",
        "grid.model.halting.tau",
        3,
    ),
    "missing_study": ("grid: {model.size: [micro]}\n", "<top>", None),
    "grid_and_zip_share": (
        "study: s\ngrid: {train.lr: [0.1]}\nzip:\n  train.lr: [0.2]\n",
        "zip.train.lr",
        4,
    ),
    "unknown_sampler": (
        "study: s\nsearch:\n  sampler: annealing\n"
        "  space: {model.halting.lambda: {low: 0.01, high: 1}}\n",
        "search.sampler",
        3,
    ),
    "bad_yaml": ("study: s\ngrid: {model.size: [micro\n", "<yaml>", None),
    "base_missing": ("study: s\nbase: nowhere.yaml\ngrid: {model.size: [micro]}\n", "base", 2),
    "when_names_no_field": (
        "study: s\ngrid: {model.method: [adaptive, vanilla]}\noverrides:\n"
        "  - when: {model.mehtod: vanilla}\n    set: {train.lr: 0.002}\n",
        "overrides[0].when.model.mehtod",
        4,
    ),
    "too_many_trials": (
        "study: s\ngrid:\n  seed: [0, 1, 2, 3, 4]\n  train.lr: [0.1, 0.2, 0.3]\nmax_trials: 10\n",
        "grid",
        2,
    ),
    "study_escapes_home": ("study: ../../escape\ngrid: {model.size: [micro]}\n", "study", 1),
    "grid_sampler_without_choices": (
        "study: s\nsearch:\n  sampler: grid\n"
        "  space:\n    model.halting.lambda: {low: 0.01, high: 1}\n",
        "search.space.model.halting.lambda",
        5,
    ),
    "grid_sampler_more_trials_than_points": (
        "study: s\nsearch:\n  sampler: grid\n  trials: 5\n"
        "  space:\n    model.halting.lambda: {choices: [0.01, 0.1]}\n",
        "search.trials",
        4,
    ),
    "space_path_unknown": (
        "study: s\nsearch:\n  space:\n    model.lamda: {choices: [1, 2]}\n",
        "search.space.model.lamda",
        4,
    ),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_sweeps_are_rejected_with_field_and_line(name, tmp_path, capsys, monkeypatch):
    body, field, line = MALFORMED[name]
    with_base = "base:" not in body
    if with_base and line:
        line += 1
    path = write(tmp_path, body, base=with_base)
    monkeypatch.setenv("ALCOT_HOME", str(tmp_path / "home"))
    assert main(["sweep", "run", str(path)]) == 2
    err = capsys.readouterr().err
    if field == "<top>":
        assert "study" in err, err
    else:
        assert f": {field}:" in err, err
    if line:
        assert f"{path}:{line}:" in err, err
    assert not (tmp_path / "home").exists()  # nothing launched, nothing written
    with pytest.raises(SweepError):
        load_sweep(path)


def test_wikitext_study_takes_its_path_from_env_or_command_line(tmp_path, monkeypatch):
    study = ROOT / "sweeps" / "wikitext2_scaling.yaml"
    monkeypatch.delenv("ALCOT_WIKITEXT2", raising=False)
    with pytest.raises(SweepError) as err:
        load_sweep(study)
    assert err.value.field == "base.data.path" and "ALCOT_WIKITEXT2" in str(err.value)
    monkeypatch.setenv("ALCOT_WIKITEXT2", "/data/wt2")
    sweep = load_sweep(study)
    assert {t.config.data.path for t in sweep.trials} == {"/data/wt2/wiki.train.tokens"}
    methods = {t.config.model.method for t in sweep.trials}
    assert methods == {"vanilla", "looped", "pause", "ponder", "fixed", "mor", "adaptive"}
    assert len(sweep.trials) == 3 * (6 + 3)  # sizes x (6 baselines + adaptive at 3 lambdas)
    flops = {round(t.est_flops / 1e14, 1) for t in sweep.trials}
    assert flops == {5.0}  # isoFLOP
    monkeypatch.delenv("ALCOT_WIKITEXT2")  # --set replaces the variable: it need not be set
    for key in ("data.path", "base.data.path"):
        other = load_sweep(study, [f"{key}=/elsewhere/train.txt"])
        assert {t.config.data.path for t in other.trials} == {"/elsewhere/train.txt"}
    assert main(["sweep", "run", str(study), "--dry-run", "--set", "data.path=/x.txt"]) == 0


def test_overrides_match_fields_that_are_not_axes(tmp_path):
    """`when` compares the trial's value of a field, swept or not (base, or the default)."""
    path = write(
        tmp_path,
        """
        study: s
        grid: {seed: [0, 1]}
        overrides:
          - when: {model.method: adaptive, data.seq_len: 128}
            set: {train.warmup_frac: 0.1}
          - when: {train.grad_accum: 1}
            set: {train.weight_decay: 0.0}
    """,
    )
    for t in load_sweep(path).trials:
        assert t.config.train.warmup_frac == 0.1 and t.config.train.weight_decay == 0.0


def test_the_trial_cap_says_how_many_and_how_to_raise_it(tmp_path, capsys):
    grid = ", ".join(str(i) for i in range(101))
    path = write(tmp_path, f"study: s\ngrid:\n  seed: [{grid}]\n  train.lr: [{grid}]\n")
    assert main(["sweep", "run", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "10,201 trials" in err and "max_trials" in err


@pytest.mark.parametrize("path", sorted((ROOT / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_sweep_is_valid(path, monkeypatch, tmp_path):
    from alcot.orchestrator.evaluation.lmeval_tasks import data_files, shipped

    wikitext = tmp_path / "wikitext-2"  # the training corpus is referenced, not read, here;
    wikitext.mkdir()  # an eval: section checks that its test file exists
    (wikitext / "wiki.test.tokens").write_text("test\n")
    monkeypatch.setenv("ALCOT_WIKITEXT2", str(wikitext))
    for template in shipped().values():  # eval: sections check that their task files exist
        for rel in data_files(template):
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / rel).touch()
    monkeypatch.setenv("ALCOT_EVAL_DATA", str(tmp_path))
    sweep = load_sweep(path)
    trials = sweep.trials
    if sweep.spec.search is not None:  # a search draws its trials: check every grid corner
        from alcot.orchestrator.sweeps.spec import make_trial

        space = sweep.spec.search.space
        values = {
            k: d["choices"] if "choices" in d else [d["low"], d["high"]] for k, d in space.items()
        }
        keys = list(values)
        trials = [
            make_trial(
                sweep.spec, sweep.base, dict(zip(keys, combo, strict=True)), path, sweep.lines
            )
            for combo in itertools.product(*values.values())
        ]
    assert trials and len({t.hash for t in trials}) == len(trials)
    # every trial evaluates more than once, so analysis has curves to compare at matched compute
    assert all(t.config.train.steps >= 2 * t.config.train.eval_every for t in trials)


def test_a_submission_waits_for_the_job_agent_of_a_fresh_cluster_and_no_longer(monkeypatch):
    """A head started seconds ago answers "No available agent to submit job" until its job
    agent registers: the submission retries that, and only that, for a bounded time."""
    from alcot.orchestrator.sweeps import sweep_commands

    monkeypatch.setattr("time.sleep", lambda s: None)

    class Cluster:
        def __init__(self, refusals, error="No available agent to submit job, please try again"):
            self.refusals, self.error, self.calls = refusals, error, 0

        def submit_job(self, **job):
            self.calls += 1
            if self.calls <= self.refusals:
                raise RuntimeError(f"Request failed with status code 500: {self.error}")
            return f"raysubmit_{job['entrypoint']}"

    fresh = Cluster(refusals=3)
    assert sweep_commands._submit(fresh, entrypoint="x") == "raysubmit_x" and fresh.calls == 4
    other = Cluster(refusals=1, error="runtime_env upload failed")
    with pytest.raises(RuntimeError, match="upload failed"):
        sweep_commands._submit(other, entrypoint="x")
    assert other.calls == 1  # any other error is the user's to see at once
    never = Cluster(refusals=10**6)
    with pytest.raises(sweep_commands.NoJobAgent, match="dashboard-agent-listen-port"):
        sweep_commands._submit(never, wait_s=0.0, entrypoint="x")
    assert never.calls == 1
