"""`alcot analyze` on the MLflow store of a real (tiny) sweep, the notebook run headless, and
clear errors (exit code 2) for studies that cannot be analysed."""

import dataclasses
import os
import textwrap
from pathlib import Path

import pytest
from conftest import home_at

from alcot.orchestrator.cli import main

ROOT = Path(__file__).resolve().parents[1]
FIGURES = [
    "curves",
    "pareto",
    "fits",
    "depth_histograms",
    "depth_vs_penalty",
    "depth_vs_difficulty",
]

SWEEP = """
study: tinystudy
base:
  seed: 0
  model: {size: micro, method: adaptive, l_max: 2}
  data: {builtin_documents: 600, vocab_size: 512, seq_len: 32}
  train: {batch_size: 8, lr: 0.01, eval_every: 2, eval_batches: 2, checkpoint_every: 100}
  tracking: {flush_seconds: 0.2}
grid:
  model.size: [micro, tiny]
  model.method: [adaptive, vanilla]
  model.halting.lambda: [0.1, 1.0]
budget: {tokens: 4096}
resources: {cpus: 1}
max_concurrent: 2
"""


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A 6-trial sweep (2 sizes x adaptive at 2 lambdas + vanilla), 8 evaluations each."""
    with home_at(tmp_path_factory.mktemp("analysishome"), shutdown_ray=True) as home:
        path = home / "sweep.yaml"
        path.write_text(textwrap.dedent(SWEEP))
        assert main(["sweep", "run", str(path)]) == 0
        yield home


def client(home):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{home / 'mlflow.db'}")


@pytest.mark.slow
def test_analyze_writes_the_report_and_logs_it_on_the_sweep_parent(study, tmp_path, capsys):
    out = tmp_path / "report"
    assert (
        main(["analyze", "--experiment", "tinystudy", "--out", str(out), "--bootstrap", "30"]) == 0
    )
    printed = capsys.readouterr().out
    for name in FIGURES:
        for ext in ("png", "svg"):
            assert (out / f"{name}.{ext}").stat().st_size > 1000, f"{name}.{ext}"
    md = (out / "report.md").read_text()
    for heading in (
        "## Runs",
        "## Perplexity against compute",
        "## Pareto front",
        "## Scaling-law fits",
        "## Depth diagnostics",
    ):
        assert heading in md
    # 6 runs, each in the runs table; fits of both methods with intervals (3 adaptive-or-more runs)
    assert md.count("| adaptive micro λ=") >= 2 and "| vanilla tiny |" in md
    assert "| adaptive | " in md and "alpha low" in md
    # two sizes only: the Chinchilla fit refuses and says why
    assert "needs at least 3 distinct values of model size N; there are 2" in md
    assert "Spearman" in md
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(FIGURES)  # self-contained
    assert 'src="curves.png"' not in page
    c = client(study)
    exp = c.get_experiment_by_name("tinystudy")
    parents = c.search_runs([exp.experiment_id], "tags.`alcot.kind` = 'sweep'")
    assert len(parents) == 1
    parent = parents[0].info.run_id
    assert f"MLflow run {parent}" in printed
    logged = {a.path for a in c.list_artifacts(parent, "analysis")}
    assert {"analysis/report.html", "analysis/report.md", "analysis/curves.png"} <= logged
    # the adaptive runs carry their per-token depth samples for the difficulty diagnostic
    for r in c.search_runs([exp.experiment_id], "tags.method = 'adaptive'"):
        assert [a.path for a in c.list_artifacts(r.info.run_id, "diagnostics")] == [
            "diagnostics/token_depth.csv"
        ]


@pytest.mark.slow
def test_report_numbers_agree_with_the_runs(study):
    from alcot.analysis import curves, depth
    from alcot.analysis.load import Study
    from alcot.analysis.scaling import fit_study

    s = Study.load("tinystudy")
    assert len(s.runs) == 6 and s.curves.groupby("run_id").size().eq(8).all()
    pts = curves.final_points(s)
    logged = s.runs.set_index("run_id")["final/val/ppl"]
    assert pts.set_index("run_id")["val_ppl"].to_dict() == pytest.approx(logged.to_dict())
    # --flops switches the compute column between the two logged counters
    nominal = curves.final_points(s, "nominal").set_index("run_id")["flops"]
    logged_nominal = s.runs.set_index("run_id")["final/flops/nominal"]
    assert nominal.to_dict() == pytest.approx(logged_nominal.to_dict())
    assert (nominal != pts.set_index("run_id")["flops"][nominal.index]).all()
    # ... and the paper's convention: 6 x all parameters per pass, so above nominal by exactly
    # the ratio of total to non-embedding parameters
    paper = curves.final_points(s, "paper").set_index("run_id")["flops"]
    logged_paper = s.runs.set_index("run_id")["final/flops/paper"]
    assert paper.to_dict() == pytest.approx(logged_paper.to_dict())
    assert (paper > nominal[paper.index]).all()
    assert curves.run_curves(s, "paper")["flops"].notna().all()
    res = fit_study(s, n_boot=0)
    for method in ("adaptive", "vanilla"):  # fitted, or refused with the reason
        assert method in res.power or " needs " in res.refused[("power_law", method)]
    assert "adaptive" in res.power
    # intervals do not depend on the runs' random MLflow ids: the same sweep in another store
    # (here: the same runs under other ids) gives the same numbers
    other = {r: f"{i:032x}"[::-1] for i, r in enumerate(s.runs["run_id"])}
    renamed = dataclasses.replace(
        s,
        runs=s.runs.assign(run_id=s.runs["run_id"].map(other)),
        curves=s.curves.assign(run_id=s.curves["run_id"].map(other)),
    )
    a, b = (fit_study(x, points="all", n_boot=30) for x in (s, renamed))
    assert (
        a.power["adaptive"].interval
        and a.power["adaptive"].interval == b.power["adaptive"].interval
    )
    td = s.token_depth()
    assert set(td["run_id"]) == set(pts.loc[pts["method"] == "adaptive", "run_id"])
    assert (td.groupby("run_id").size() == 2 * 8 * 32).all()  # eval_batches x batch x seq
    corr = depth.difficulty_correlation(s)
    assert len(corr) == 4
    varied = corr["depth_easiest_quarter"] != corr["depth_hardest_quarter"]
    assert varied.any()  # some run halts tokens at different depths: rho is defined there
    assert corr.loc[varied, "spearman_rho"].between(-1, 1).all()


@pytest.mark.slow
def test_notebook_runs_headless(study, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "analysis" / "notebooks" / "scaling_laws.ipynb", as_version=4)
    os.environ.update(ALCOT_EXPERIMENT="tinystudy", ALCOT_BOOTSTRAP="20")
    try:
        NotebookClient(
            nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        ).execute()
    finally:
        for k in ("ALCOT_EXPERIMENT", "ALCOT_BOOTSTRAP"):
            os.environ.pop(k, None)
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 5  # curves, pareto, fits, depth histograms, difficulty


@pytest.mark.slow
def test_unanalysable_studies_exit_2_with_a_clear_message(study, tmp_path, capsys):
    out = str(tmp_path / "r")
    assert main(["analyze", "--experiment", "no-such-study", "--out", out]) == 2
    assert "experiment 'no-such-study' does not exist" in capsys.readouterr().err
    assert main(["analyze", "--experiment", "tinystudy", "--sweep", "zz", "--out", out]) == 2
    assert "no training runs for sweep zz" in capsys.readouterr().err
    c = client(study)
    exp = c.create_experiment("nometrics")
    run = c.create_run(exp, tags={"config_hash": "0" * 40, "method": "vanilla", "size": "micro"})
    c.log_metric(run.info.run_id, "train/loss", 3.0, step=1)
    c.set_terminated(run.info.run_id)
    assert main(["analyze", "--experiment", "nometrics", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "never logged val/loss, flops/realised" in err
    assert not Path(out).exists()  # nothing half-written
