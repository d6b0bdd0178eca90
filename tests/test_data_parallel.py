"""Two data-parallel ranks under torchrun (gloo, CPU) train like one process with the same
global batch: each rank takes half of every batch, DDP averages the gradients."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SMALL_RUN

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["metrics"]["train/loss"] for r in rows}


@pytest.mark.slow
def test_ddp_two_ranks_match_one_process(alcot_home, tmp_path):
    sets = [a for s in SMALL_RUN for a in ("--set", s)]
    sets += ["--set", "train.steps=6", "--no-progress"]
    cmd = ["train", "configs/train_adaptive.yaml", *sets]
    one = subprocess.run(
        [str(BIN / "alcot"), *cmd, "--set", f"out_dir={tmp_path / 'one'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stdout + one.stderr
    two = subprocess.run(
        [
            str(BIN / "torchrun"),
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "alcot.orchestrator.cli",
            *cmd,
            "--set",
            f"out_dir={tmp_path / 'two'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert set(a) == set(b) == set(range(1, 7))
    for step in a:
        assert abs(a[step] - b[step]) < 1e-4, (step, a[step], b[step])
    assert (tmp_path / "two" / "checkpoints" / "step_00000005" / "meta.json").exists()
