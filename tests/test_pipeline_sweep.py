"""A sweep trial with ``resources.pipeline_parallel: 2`` runs as a gang of two pipeline stages
on a local Ray (Ray Train places the workers; torch.distributed over gloo joins them)."""

import textwrap

import pytest
from conftest import home_at
from test_sweep_run import BASE, children

from alcot.orchestrator.cli import main


@pytest.mark.slow
def test_pipeline_trial_runs_as_a_gang(tmp_path_factory, tmp_path):
    path = tmp_path / "sweep.yaml"
    body = """
        study: pipegang
        grid:
          model.halting.lambda: [0.01]
        budget: {tokens: 4096}
        resources: {cpus: 0.5, pipeline_parallel: 2}
    """
    path.write_text(textwrap.dedent(BASE) + textwrap.dedent(body))
    with home_at(tmp_path_factory.mktemp("pipehome"), shutdown_ray=True) as home:
        assert main(["sweep", "run", str(path)]) == 0
        kids = children(home, "pipegang", "FINISHED")
    assert len(kids) == 1
    run = kids[0].data
    assert run.tags["alcot.world_size"] == "2"
    assert run.params["model.pipeline_parallel_size"] == "2"
    assert run.params["parallel.layout"] == "tp1 x pp2 x dp1"
    assert "val/ppl" in run.metrics and run.metrics["train/loss"] > 0
