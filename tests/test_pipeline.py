"""Pipeline parallelism: P = 2 stages over gloo equal one process from the same weights, in
logits, loss, every gradient and after three optimizer steps, and in greedy generation, for
every method; TP = 2 x PP = 2 (four processes) equals one process for adaptive latent CoT."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import spread_router, tiny_config

from alcot.model.generate import generate
from alcot.model.layouts import full_state_dict
from alcot.model.pipeline import bubble_fraction, simulate_bubble

CASES = [
    dict(method="adaptive", halting={"tau": 0.3, "lambda": 0.5}),
    dict(method="adaptive", mix="distribution", halting={"tau": 0.3, "router": "per_step"}),
    dict(method="fixed", l_max=2),
    dict(method="vanilla"),
    dict(method="looped", l_max=2),
    dict(method="pause", l_max=2),
    dict(method="ponder", l_max=2),
    dict(method="mor"),
]
MICRO = 3  # micro-batches per step


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(work: Path, tp: int, pp: int, worker: str = "pp_worker.py") -> None:
    world = tp * pp
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_port()), WORLD_SIZE=str(world))
    env["OMP_NUM_THREADS"] = "1"
    script = Path(__file__).with_name(worker)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(work), str(tp), str(pp)],
            env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(world)
    ]
    logs = [p.communicate(timeout=600)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-6000:]


def _reference(build, tmp_path: Path, cases: list[dict]) -> list[dict]:
    """One process: three AdamW steps over the micro-batches, from checkpoints it writes."""
    g = torch.Generator().manual_seed(7)
    batches = [
        (
            torch.randint(0, 128, (2, 12), generator=g),
            torch.randint(0, 128, (2, 12), generator=g),
            None,
        )
        for _ in range(MICRO)
    ]
    torch.save(batches, tmp_path / "batch.pt")
    refs = []
    for i, case in enumerate(cases):
        model = build(**case)
        if model.router is not None:
            spread_router(model)
        torch.save(full_state_dict(model), tmp_path / f"ckpt{i}.pt")
        gen = generate(model, batches[0][0][:, :5], 4)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses, first = [], None
        for step in range(3):
            opt.zero_grad(set_to_none=True)
            outs = []
            for x, y, _ in batches:
                out = model(x, y, return_logits=True)
                (out.loss / MICRO).backward()
                outs.append(out)
            losses.append([o.loss.detach() for o in outs])
            if step == 0:
                first = {
                    "logits": [o.logits.detach() for o in outs],
                    "depth": [o.depth for o in outs],
                    "grads": {
                        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
                    },
                    "generated": (gen.tokens, gen.depth, gen.logits),
                }
            opt.step()
        refs.append({**first, "losses": losses, "final": full_state_dict(model)})
    (tmp_path / "cases.json").write_text(json.dumps([tiny_config(**c).to_dict() for c in cases]))
    return refs


def _compare(ref: dict, got: dict, label) -> None:
    # generation through the stages (full forwards) equals the one-process (cached) decoder
    (rt, rd, rl), (gt, gd, gl) = ref["generated"], got["generated"]
    assert torch.equal(rt, gt) and torch.equal(rd, gd), label
    torch.testing.assert_close(gl, rl, atol=1e-4, rtol=0)
    for a, b in zip(ref["depth"], got["depth"], strict=True):
        assert torch.equal(a, b), label
    for a, b in zip(ref["logits"], got["logits"], strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0, msg=lambda m: f"{label}: {m}")
    for step, (a_step, b_step) in enumerate(zip(ref["losses"], got["losses"], strict=True)):
        for a, b in zip(a_step, b_step, strict=True):
            assert abs(float(a) - float(b)) < 1e-5, (label, step, float(a), float(b))
    assert set(got["grads"]) >= set(ref["grads"]), label
    for name, grad in ref["grads"].items():
        diff = (got["grads"][name] - grad).abs().max().item()
        assert diff < 1e-5, (label, name, diff, grad.abs().max().item())
    # After three AdamW steps: gradients agree to float rounding (summation order differs:
    # a stage's output gradient adds the loss's part and the back-edge's part separately), and
    # Adam divides by sqrt(v), which magnifies those differences where gradients are tiny.
    for name, w in ref["final"].items():
        if isinstance(w, torch.Tensor):
            diff = (got["final"][name] - w).abs().max().item()
            assert diff < 5e-5, (label, "after 3 steps", name, diff)


@pytest.mark.slow
def test_pp2_equals_pp1_every_method(build, tmp_path: Path):
    refs = _reference(build, tmp_path, CASES)
    depths = torch.cat([d.flatten() for d in refs[0]["depth"]])
    assert len(depths.unique()) >= 3, depths.unique()  # halting leaves several depths
    _launch(tmp_path, 1, 2)
    for i, ref in enumerate(refs):
        got = torch.load(tmp_path / f"out{i}_1x2.pt", weights_only=False)
        assert got["events"] > 0
        _compare(ref, got, CASES[i])


@pytest.mark.slow
def test_tp2_pp2_equals_one_process(build, tmp_path: Path):
    cases = CASES[:1]
    refs = _reference(build, tmp_path, cases)
    _launch(tmp_path, 2, 2)
    got = torch.load(tmp_path / "out0_2x2.pt", weights_only=False)
    _compare(refs[0], got, "tp2 x pp2")


def test_every_tensor_handed_to_torch_distributed_is_on_the_communication_device(tmp_path):
    """NCCL refuses CPU tensors: the pipeline's receive buffers, request headers, step
    statistics and reductions must be created on the communication device. Checked on two gloo
    stages with the factories' default device set to ``meta`` inside the pipeline code (see
    tests/pp_device_worker.py): a tensor made without naming its device is caught."""
    _launch(tmp_path, 1, 2, worker="pp_device_worker.py")
    seen = json.loads((tmp_path / "devices.json").read_text())
    for name in ("isend", "irecv", "broadcast", "all_reduce"):
        assert seen[name][0] > 0, (name, seen)
    assert all(devices == ["cpu"] for _, devices in seen.values()), seen


def test_bubble_fraction():
    # M >= P: (P - 1) fill/drain slots out of S M + P - 1
    assert bubble_fraction(2, 4, 3) == pytest.approx(1 / 13)
    assert bubble_fraction(4, 8, 1) == pytest.approx(3 / 11)  # plain GPipe when S = 1
    # M < P: each step waits for the ring: (S - 1) P + M + P - 1 slots
    assert bubble_fraction(4, 2, 2) == pytest.approx(1 - 4 / 9)


def test_simulated_schedule_matches_the_closed_form():
    for p, m, s in [(2, 4, 3), (2, 1, 4), (4, 8, 2), (4, 2, 3), (3, 3, 1)]:
        sim = simulate_bubble(p, [[1.0] * s for _ in range(m)])
        assert sim == pytest.approx(bubble_fraction(p, m, s)), (p, m, s)
    # halting: cheaper later steps make the fill/drain of step 0 weigh more
    assert simulate_bubble(2, [[4.0, 2.0, 1.0]] * 4) > bubble_fraction(2, 4, 3)
