"""The router recipe (issue 24): depth-0 equivalence with vanilla, and the router's warm-up
options (gate floor, lambda warm-up, router learning rate)."""

import pytest
import torch

V = 128


def batch(b=3, s=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (b, s), generator=g), torch.randint(0, V, (b, s), generator=g)


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def shut_router(model, bias: float = -30.0) -> None:
    """g ~ 0 for every token: reach r(1) < tau, so every token halts after step 0."""
    with torch.no_grad():
        for name, p in model.router.named_parameters():
            p.copy_(torch.full_like(p, bias) if name.endswith("bias") else torch.randn_like(p))


@pytest.mark.parametrize("num_layers", [2, 4])
def test_same_seed_gives_vanilla_the_adaptive_backbone(build, num_layers):
    """The router's draws come from their own seed: vanilla and adaptive built from the same
    seed share every other weight bit for bit."""
    vanilla = build(seed=3, method="vanilla", num_layers=num_layers)
    adaptive = build(seed=3, method="adaptive", num_layers=num_layers)
    va, ad = vanilla.state_dict(), adaptive.state_dict()
    assert set(ad) - set(va) == {k for k in ad if k.startswith("router.")}
    assert set(ad) - set(va)
    for name, t in va.items():
        if isinstance(t, torch.Tensor):
            assert torch.equal(t, ad[name]), name


@pytest.mark.parametrize("mix", ["state", "distribution"])
@pytest.mark.parametrize("num_layers", [2, 4])
def test_depth_zero_adaptive_equals_vanilla(build, num_layers, mix):
    """Every token halts at step 0: logits, losses and every backbone gradient are vanilla's
    (same weights from the same seed); the router's own gradient aside."""
    vanilla = build(seed=7, method="vanilla", num_layers=num_layers)
    adaptive = build(seed=7, method="adaptive", num_layers=num_layers, mix=mix)
    shut_router(adaptive)
    x, y = batch()
    a = vanilla(x, y, return_logits=True)
    b = adaptive(x, y, return_logits=True)
    assert b.mean_depth == 0
    if mix == "state":  # distribution mixing returns log-probs
        torch.testing.assert_close(b.logits, a.logits, atol=1e-5, rtol=0)
    else:
        torch.testing.assert_close(b.logits, a.logits.log_softmax(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(b.ce_loss, a.ce_loss, atol=1e-6, rtol=0)
    assert float(b.adapt_loss) == 0.0
    torch.testing.assert_close(b.loss, a.loss, atol=1e-6, rtol=0)
    a.loss.backward()
    b.loss.backward()
    ga, gb = grads(vanilla), grads(adaptive)
    backbone = {n: g for n, g in gb.items() if not n.startswith("router.")}
    assert set(backbone) == set(ga)
    for name, g in ga.items():
        torch.testing.assert_close(backbone[name], g, atol=1e-6, rtol=1e-5, msg=name)


def test_gate_floor_keeps_tokens_running_during_the_router_warm_up(build):
    """A shut router under a floor of 0.9: in training every token runs every step until the
    warm-up ends; evaluation (and training after the warm-up) sees the router as it is."""
    model = build(halting={"gate_floor": 0.9, "router_warmup_frac": 0.2, "tau": 0.1})
    shut_router(model)
    x, y = batch()
    model.train()
    model.halting_progress = 0.0
    assert model(x, y).mean_depth == model.cfg.l_max
    model.halting_progress = 0.1  # floor 0.45: r(2) = 0.2, r(3) = 0.09 < tau
    assert model(x, y).mean_depth == 2
    model.halting_progress = 0.2
    assert model(x, y).mean_depth == 0
    model.halting_progress = 0.0
    model.eval()
    assert model(x, y).mean_depth == 0
    model.train()
    model.halting_progress = None  # not inside train(): no warm-up
    assert model(x, y).mean_depth == 0


def test_lambda_warm_up_scales_the_adaptive_loss(build):
    model = build(halting={"lambda": 0.5, "lambda_warmup_frac": 0.5, "tau": 0.05})
    x, y = batch()
    model.train()
    for progress, scale in ((0.0, 0.0), (0.25, 0.5), (0.5, 1.0), (0.9, 1.0), (None, 1.0)):
        model.halting_progress = progress
        out = model(x, y)
        assert float(out.adapt_loss) > 0
        torch.testing.assert_close(out.loss, out.ce_loss + 0.5 * scale * out.adapt_loss)


@pytest.mark.parametrize(
    "key, value",
    [
        ("gate_floor", 1.0),
        ("gate_floor", -0.1),
        ("router_warmup_frac", 1.5),
        ("lambda_warmup_frac", -1.0),
        ("router_lr_scale", -1.0),
    ],
)
def test_recipe_options_are_validated(key, value):
    from alcot.common.typed import ConfigError
    from alcot.model import ModelConfig

    with pytest.raises(ConfigError, match=f"model.halting.{key}"):
        ModelConfig.from_dict({"size": "micro", "halting": {key: value}})


def test_diagnose_train_records_what_moves_the_router(alcot_home, tmp_path, capsys):
    """``alcot diagnose --train``: per probed step the gradient shares and cosines, the gates,
    reach, weights and per-step losses; with router_lr_scale 0 the router does not move."""
    import json

    from conftest import SMALL_RUN

    from alcot.orchestrator.cli import main

    config = tmp_path / "run.yaml"
    config.write_text("seed: 0\n")
    for scale, out in ((1.0, tmp_path / "moving"), (0.0, tmp_path / "frozen")):
        sets = [a for s in SMALL_RUN for a in ("--set", s)]
        sets += ["--set", f"model.halting.router_lr_scale={scale}"]
        args = ["--steps", "12", "--every", "4", "--out", str(out)]
        code = main(["diagnose", "--train", str(config), *sets, *args])
        assert code == 0, capsys.readouterr()
        rows = [json.loads(line) for line in (out / "probe.jsonl").read_text().splitlines()]
        hist = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, 11)) + [12]
        assert [h["step"] for h in hist] == list(range(1, 13))
        first = rows[0]
        for key in (
            "router/share",
            "router/cosine",
            "backbone/share",
            "k0/gate",
            "k0/dce_dg",
            "k0/dadapt_dg",
            "k1/ce",
            "k1/ce0",
            "k0/weight",
            "k0/reach_next",
            "k0/q",
        ):
            assert key in first and first[key] == first[key], key  # present, not NaN
        # every token runs step 1 (r(1) about 0.5), most step 2 (r(2) about 0.25 >= tau)
        assert first["k0/ran"] == 1.0 and first["k1/ran"] == 1.0 and 1.5 < first["depth"] <= 2
        assert 0 < first["router/share"] < 1
        # the adaptive loss pushes every continuing gate down
        assert all(r["k0/dadapt_dg"] > 0 for r in rows if r["k0/live"] > 0)
        biases = {round(r["router/bias"], 7) for r in rows}
        assert (len(biases) == 1) is (scale == 0.0)


def test_recipe_fields_keep_older_identities():
    """Runs recorded before the recipe existed keep their hashes at its off values, and a
    method without a router never depends on it, whatever the defaults."""
    from alcot.orchestrator.config import identity_dict, load_run_config

    keys = ("gate_floor", "router_warmup_frac", "lambda_warmup_frac", "router_lr_scale")
    off = [
        "model.halting.gate_floor=0.0",
        "model.halting.router_warmup_frac=0.0",
        "model.halting.lambda_warmup_frac=0.0",
        "model.halting.router_lr_scale=1.0",
    ]
    adaptive = identity_dict(load_run_config(None, off))["model"]["halting"]
    assert not set(keys) & set(adaptive)
    for method in ("vanilla", "fixed"):
        for sets in ([], ["model.halting.gate_floor=0.5", "model.halting.router_lr_scale=0.3"]):
            d = identity_dict(load_run_config(None, [f"model.method={method}", *sets]))
            assert not set(keys) & set(d["model"]["halting"]), (method, sets)
    on = identity_dict(load_run_config(None, ["model.halting.gate_floor=0.5"]))
    assert on["model"]["halting"]["gate_floor"] == 0.5
