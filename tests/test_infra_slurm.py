"""``infra/slurm/alcot-sweep.sbatch`` through ``alcot sweep run --slurm`` on a real one-node
Slurm cluster (munged, slurmctld, slurmd started here): Ray up inside the allocation, the
sweep's trials in MLflow, Ray gone afterwards."""

import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from services import ROOT, free_port, slurm_cluster

BIN = Path(sys.executable).parent

SWEEP = """
study: slurmtest
base:
  seed: 0
  model: {size: micro, method: adaptive, l_max: 2}
  data: {builtin_documents: 600, vocab_size: 512, seq_len: 32}
  train: {batch_size: 8, lr: 0.01, eval_every: 1000, eval_batches: 2, checkpoint_every: 8}
  tracking: {flush_seconds: 0.2, log_model: false}
grid:
  model.halting.lambda: [0.01, 0.1]
budget: {tokens: 4096}
resources: {cpus: 1}
max_concurrent: 2
"""


def alcot(*args, env, cwd=ROOT, timeout=120):
    return subprocess.run(
        [str(BIN / "alcot"), *args], env=env, cwd=cwd, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def test_slurm_flag_checks_its_input(tmp_path):
    env = dict(os.environ)
    res = alcot("sweep", "run", str(tmp_path / "missing.yaml"), "--slurm", env=env)
    assert res.returncode == 2 and "missing.yaml" in res.stderr
    res = alcot("sweep", "run", "sweeps/quickstart.yaml", "--sbatch=--nodes=2", env=env)
    assert res.returncode == 2 and "--sbatch only goes with --slurm" in res.stderr
    res = alcot(
        "sweep", "run", "sweeps/quickstart.yaml", "--slurm", "--dry-run",
        "--sbatch=--nodes=3", "--set", "seed=4", env=env,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    script = ROOT / "infra/slurm/alcot-sweep.sbatch"
    quick = ROOT / "sweeps/quickstart.yaml"
    assert f"sbatch --parsable --nodes=3 {script} {quick} --set seed=4" in res.stdout


def _job_state(job_id: str, env) -> dict[str, str]:
    res = subprocess.run(
        ["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True
    )
    return dict(re.findall(r"(\w+)=(\S+)", res.stdout))


@pytest.mark.slow
def test_sweep_on_a_real_slurm_cluster(tmp_path):
    from mlflow.tracking import MlflowClient

    home = tmp_path / "home"
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(textwrap.dedent(SWEEP))
    out = tmp_path / "job-%j.out"
    with slurm_cluster() as cluster:
        env = dict(
            cluster.env(),
            ALCOT_HOME=str(home),
            ALCOT_RAY_PORT=str(free_port()),
            PATH=f"{BIN}:{os.environ['PATH']}",
        )
        env.pop("MLFLOW_TRACKING_URI", None)
        res = alcot("sweep", "run", str(sweep), "--slurm", f"--sbatch=--output={out}", env=env)
        assert res.returncode == 0, res.stdout + res.stderr
        job_id = re.search(r"submitted Slurm job (\d+)", res.stdout).group(1)
        log = Path(str(out).replace("%j", job_id))
        deadline = time.time() + 480
        state = {}
        while time.time() < deadline:
            state = _job_state(job_id, env)
            if state.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
                break
            time.sleep(2)
        text = log.read_text() if log.exists() else ""
        assert state.get("JobState") == "COMPLETED", (
            state,
            text[-4000:],
            cluster.log("slurmd.log"),
        )
        assert state.get("ExitCode") == "0:0"
    assert "1 Ray node(s) up" in text and "all trials finished" in text
    assert "stopping Ray on 1 node(s)" in text
    assert not Path(f"/tmp/ray-{job_id}").exists()  # torn down, temp folder removed
    left = subprocess.run(["pgrep", "-f", f"/tmp/ray-{job_id}"], capture_output=True, text=True)
    assert left.stdout.strip() == "", "Ray processes of the job outlived it"

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name("slurmtest")
    runs = client.search_runs([exp.experiment_id])
    kids = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(kids) == 2 and all(r.info.status == "FINISHED" for r in kids)
    assert sorted(float(r.data.params["model.halting.lambda"]) for r in kids) == [0.01, 0.1]
    parents = [r for r in runs if r.data.tags.get("alcot.kind") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
