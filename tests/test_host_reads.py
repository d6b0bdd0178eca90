"""Host reads of tensor values (each a GPU stall) per trainer step and per generated token,
counted on the CPU with ``alcot.model.hostreads`` (the same calls synchronise on a GPU)."""

from pathlib import Path

import pytest
import torch
from conftest import small_run, spread_router

from alcot.model.hostreads import TRAINER_HOST_CODE, count_host_reads


def test_the_counter_sees_every_kind_of_read():
    t = torch.tensor([1.0, 0.0])
    with count_host_reads() as r:
        t.sum().item()
        t.tolist()
        bool(t.any())
        float(t[0])
        int(t[0])
        t.nonzero()
        t.cpu()
        f"{t[0]:.1f}"
        torch.nonzero_static(t, size=1)  # a size given in advance reads nothing
        _ = t.numel(), t.shape
    assert r.total == 8
    assert set(r.by_kind) == {"item", "tolist", "bool", "float", "int", "nonzero", "cpu", "format"}


def _reads_of_training(home: Path, tmp: Path, method: str, steps: int):
    from alcot.data import prepare
    from alcot.model.trainer import train

    out = tmp / f"{method}{steps}"
    cfg = small_run(
        out,
        f"model.method={method}",
        f"train.steps={steps}",
        "train.log_every=1000",
        "train.eval_every=1000",
        "train.checkpoint_every=1000",
        "model.halting.tau=0.3",
    )
    data = prepare(cfg.data, home / "cache", log=lambda *_: None)
    with count_host_reads(where=True, host_code=TRAINER_HOST_CODE) as reads:
        res = train(cfg.model, data, cfg.train, cfg.seed, out, cfg.data.seq_len, [], progress=False)
    assert res.status == "finished", res.message
    return reads, cfg.model.l_max


@pytest.mark.parametrize("method", ["vanilla", "fixed", "adaptive", "mor"])
def test_host_reads_per_trainer_step(alcot_home, tmp_path, method):
    """Runs of 2 and 5 steps differ by 3 steady steps (setup, the final evaluation and
    checkpoint are the same in both): at most 2 reads per step for vanilla and fixed, 2 + l_max
    for adaptive and MoR (their one read per latent step: the tokens each row still runs)."""
    short, l_max = _reads_of_training(alcot_home, tmp_path, method, 2)
    long, _ = _reads_of_training(alcot_home, tmp_path, method, 5)
    per_step = (long.total - short.total) / 3
    sites = {k: v - short.by_site[k] for k, v in long.by_site.items() if v != short.by_site[k]}
    budget = 2 if method in ("vanilla", "fixed") else 2 + l_max
    assert per_step <= budget, sites
    if method in ("vanilla", "fixed"):
        assert per_step == 0, sites
    else:
        assert per_step <= l_max, sites


@pytest.mark.parametrize("method", ["vanilla", "fixed", "adaptive", "mor"])
def test_host_reads_of_a_model_step(build, method):
    """Forward and backward of one batch: none for vanilla and fixed, at most one per latent
    step for adaptive and MoR."""
    model = build(method=method, halting={"tau": 0.3})
    if model.router is not None:
        spread_router(model)
    x = torch.randint(0, 128, (3, 16))
    with count_host_reads(where=True) as reads:
        out = model(x, x)
        out.loss.backward()
    limit = 0 if method in ("vanilla", "fixed") else model.cfg.l_max
    assert reads.total <= limit, reads.by_site


@pytest.mark.parametrize("method", ["vanilla", "fixed", "adaptive", "mor"])
def test_host_reads_per_generated_token(build, method):
    """Static cached decoding reads nothing per token (the stop check, when given, is the one
    read left); step-skipping decoding reads at most one flag per latent step."""
    from alcot.model.generate import generate

    model = build(method=method, halting={"tau": 0.3})
    if model.router is not None:
        spread_router(model)
    prompt = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(1))

    def reads(n, **kw):
        with count_host_reads(where=True) as r:
            generate(model, prompt, n, **kw)
        return r

    short, long = reads(1, static=True), reads(9, static=True)
    assert (long.total - short.total) / 8 == 0, long.by_site
    stopped = reads(9, static=True, stop=lambda toks: bool((toks == -1).any()))
    assert (stopped.total - short.total) / 9 <= 1
    skipping = reads(9, static=False).total - reads(1, static=False).total
    assert skipping / 8 <= model.cfg.l_max + 1
