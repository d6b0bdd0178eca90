"""The trainer under pipeline parallelism, and checkpoints that resume at another layout: a run
written at (tensor 2, pipeline 2) resumes at (1, 1), and one written at (1, 1) resumes at
(2, 2), each taking exactly the next steps the original layout took."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SMALL_RUN

from alcot.orchestrator.cli import main

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["metrics"]["train/loss"]) for r in rows]


def _train(out: Path, tp: int, pp: int, dp: int = 1, *more: str) -> None:
    sets = [a for s in (*SMALL_RUN, *more) for a in ("--set", s)]
    sets += ["--set", "train.steps=5", "--set", "train.checkpoint_every=3"]
    sets += ["--set", "train.grad_accum=2", "--set", "train.eval_every=100", "--no-progress"]
    sets += ["--set", "tracking.log_model=false", "--set", f"model.tensor_parallel_size={tp}"]
    sets += ["--set", f"model.pipeline_parallel_size={pp}", "--set", f"out_dir={out}"]
    cmd = ["train", str(ROOT / "configs/train_adaptive.yaml"), *sets]
    world = tp * pp * dp
    if world == 1:  # in this process: `alcot train` as the command line runs it
        assert main(cmd) == 0
        return
    argv = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={world}"]
    argv += ["-m", "alcot.orchestrator.cli", *cmd]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("written, resumed", [((2, 2), (1, 1)), ((1, 1), (2, 2))])
def test_checkpoint_resumes_at_another_layout(alcot_home, tmp_path, written, resumed):
    out = tmp_path / "run"
    _train(out, *written)
    first = dict(losses(out))
    assert set(first) == set(range(1, 6))
    ckpts = out / "checkpoints"
    expected = "tp0.pt" if written == (1, 1) else "tp1_pp1.pt"
    assert (ckpts / "step_00000003" / expected).exists()
    # as if the run had been killed right after its step-3 checkpoint (a step the journal holds
    # already is not journalled again on resume): resume from step 3 at the other layout
    shutil.rmtree(ckpts / "step_00000005")
    journal = out / "metrics.jsonl"
    rows = [line for line in journal.read_text().splitlines() if json.loads(line)["step"] <= 3]
    journal.write_text("".join(line + "\n" for line in rows))
    _train(out, *resumed)
    again = losses(out)[len(rows) :]
    assert [s for s, _ in again] == [4, 5]
    for step, loss in again:
        assert abs(loss - first[step]) < 1e-5, (step, loss, first[step])
    # evaluation loads the final checkpoint (written at `resumed`) as one process
    from alcot.orchestrator.evaluation.loading import load_run

    loaded = load_run(out)
    assert loaded.checkpoint.step == 5
    out1 = loaded.model(torch.randint(0, 64, (1, 8)))
    assert out1.depth.shape == (1, 8)


@pytest.fixture(scope="module")
def trained(alcot_home, tmp_path_factory):
    """``trained(tp, pp, dp, *sets)``: the per-step losses of that run, trained once for the
    module (the PP 2 run in fp32 is the reference of two tests)."""
    done: dict[tuple, dict[int, float]] = {}

    def get(tp: int, pp: int, dp: int, *more: str) -> dict[int, float]:
        key = (tp, pp, dp, *more)
        if key not in done:
            out = tmp_path_factory.mktemp("run")
            _train(out, tp, pp, dp, *more)
            done[key] = dict(losses(out))
        return done[key]

    return get


@pytest.mark.slow
def test_pipeline_with_data_parallel_matches_one_replica(trained):
    """PP 2 x DP 2 (gradients averaged on the main copies) trains like PP 2 alone."""
    a = trained(1, 2, 1, "train.precision=fp32")
    b = trained(1, 2, 2, "train.precision=fp32")
    assert set(a) == set(b) == set(range(1, 6))
    for step in a:
        assert abs(a[step] - b[step]) < 1e-4, (step, a[step], b[step])


@pytest.mark.slow
@pytest.mark.parametrize("precision, rel", [("fp32", 1e-5), ("bf16", 5e-3)])
def test_pipeline_trains_like_one_process_from_the_seed(trained, precision, rel):
    """PP 2 and PP 1 started from the same seed build the same initial weights (each layer,
    the embeddings, head and router seed their own draws) and train alike: five steps of two
    micro-batches, losses equal to fp32 reduction order, or within bf16's rounding in bf16
    (where each latent step and micro-batch is a separate backward call on each stage, every one
    accumulated into the fp32 main gradients)."""
    a = trained(1, 1, 1, f"train.precision={precision}")
    b = trained(1, 2, 1, f"train.precision={precision}")
    assert set(a) == set(b) == set(range(1, 6))
    for step in a:
        assert abs(a[step] - b[step]) <= rel * abs(a[step]), (step, a[step], b[step])
