"""Tensor parallel size 2 over two gloo processes gives the same logits, loss and gradients as
size 1, starting from the same checkpoint (not from the same seed)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import spread_router, tiny_config

from alcot.model.layouts import full_state_dict

CASES = [
    dict(method="adaptive", halting={"tau": 0.3, "lambda": 0.5}),
    dict(method="adaptive", mix="distribution", halting={"tau": 0.3, "router": "per_step"}),
    dict(method="ponder", l_max=2),
    dict(method="pause", l_max=2),
    dict(method="mor"),
]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_tp2_equals_tp1(build, tmp_path: Path):
    g = torch.Generator().manual_seed(7)
    x = torch.randint(0, 128, (2, 16), generator=g)
    y = torch.randint(0, 128, (2, 16), generator=g)
    torch.save((x, y), tmp_path / "batch.pt")
    refs = []
    for i, case in enumerate(CASES):
        model = build(**case)
        if model.router is not None:
            spread_router(model)
        torch.save(full_state_dict(model), tmp_path / f"ckpt{i}.pt")
        out = model(x, y, return_logits=True)
        out.loss.backward()
        refs.append((out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (tmp_path / "cases.json").write_text(json.dumps([tiny_config(**c).to_dict() for c in CASES]))

    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_port()), WORLD_SIZE="2")
    worker = Path(__file__).with_name("tp_worker.py")
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(tmp_path)],
            env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(2)
    ]
    logs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-4000:]

    for i, (ref, ref_grads) in enumerate(refs):
        got = torch.load(tmp_path / f"out{i}.pt", weights_only=True)
        assert got["roundtrip"], "gathering the TP=2 shards did not give back the checkpoint"
        assert torch.equal(got["depth"], ref.depth)
        torch.testing.assert_close(got["logits"], ref.logits.detach(), atol=1e-5, rtol=0)
        torch.testing.assert_close(got["loss"], ref.loss.detach(), atol=1e-6, rtol=0)
        for name, grad in ref_grads.items():
            diff = (got["grads"][name] - grad).abs().max().item()
            assert diff < 1e-5, (i, name, diff, grad.abs().max().item())
