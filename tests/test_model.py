import math

import pytest
import torch
from conftest import spread_router

from alcot.model.reference import naive_latent_forward

V = 128


def batch(b=3, s=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (b, s), generator=g), torch.randint(0, V, (b, s), generator=g)


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),  # defaults: linear router, state mixing, gate loss
        dict(mix="distribution"),
        dict(halting={"loss": "reach", "beta": 2.0}),
        dict(halting={"loss": "act"}),
        dict(halting={"loss": "pondernet"}),
        dict(halting={"router": "per_step"}),
        dict(halting={"router": "mlp"}),
        dict(embed_scale=math.sqrt(2.5 * 64)),
    ],
)
def test_efficient_matches_naive_reference(build, overrides):
    halting = {"tau": 0.3, "lambda": 0.5, **overrides.pop("halting", {})}
    model = build(halting=halting, **overrides)
    spread_router(model)
    x, y = batch()
    out, _ = model.latent_forward(x, y, return_logits=True)
    out.loss.backward()
    g_fast = grads(model)
    model.zero_grad()
    loss, ce, adapt, logits, depth = naive_latent_forward(model, x, y)
    loss.backward()
    g_ref = grads(model)

    # the comparison must exercise pruning: tokens stop at several different depths
    assert len(torch.unique(out.depth)) >= 3, torch.bincount(out.depth.flatten())
    assert torch.equal(out.depth, depth)
    torch.testing.assert_close(out.logits, logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.adapt_loss, adapt, atol=1e-5, rtol=0)
    assert set(g_fast) == set(g_ref)
    assert model.router is not None and any("router" in n for n in g_fast)
    for name in g_fast:
        torch.testing.assert_close(g_fast[name], g_ref[name], atol=1e-5, rtol=0, msg=name)


def test_fixed_depth_matches_naive_reference(build):
    model = build(method="fixed")
    x, y = batch()
    out, _ = model.latent_forward(x, y, return_logits=True)
    loss, _, _, logits, depth = naive_latent_forward(model, x, y)
    assert torch.all(out.depth == 3) and torch.equal(depth, out.depth)
    torch.testing.assert_close(out.logits, logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, loss, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["adaptive", "fixed", "vanilla", "looped", "pause", "ponder"])
def test_causality_at_every_latent_step(build, method):
    model = build(method=method, halting={"tau": 0.3})
    if model.router is not None:
        spread_router(model)
    x, _ = batch(b=2, s=16)
    t = 9
    x2 = x.clone()
    x2[:, t] = (x2[:, t] + 1) % V
    with torch.no_grad():
        if model.cfg.latent:
            a, ta = model.latent_forward(x, return_logits=True, keep_states=True)
            b, tb = model.latent_forward(x2, return_logits=True, keep_states=True)
            assert torch.equal(a.depth[:, :t], b.depth[:, :t])
            assert len(ta.hidden) == model.cfg.l_max + 1
            for k, (ha, hb) in enumerate(zip(ta.hidden, tb.hidden, strict=False)):
                ran = ta.ran[k][:, :t].t()[..., None]  # [t, b, 1]
                torch.testing.assert_close(ha[:t] * ran, hb[:t] * ran, atol=1e-6, rtol=0)
        else:
            a, b = model(x, return_logits=True), model(x2, return_logits=True)
    # Not bit-exact: a later token's halting changes how many tokens a packed pass carries, and
    # with it the blocking (summation order) of the matmuls. A real leak would be O(1e-2).
    torch.testing.assert_close(a.logits[:, :t], b.logits[:, :t], atol=1e-6, rtol=0)
    assert not torch.allclose(a.logits[:, t:], b.logits[:, t:])


def test_l_max_zero_equals_vanilla(build):
    vanilla = build(method="vanilla")
    latent = build(seed=5, method="adaptive", l_max=0)
    latent.load_state_dict(vanilla.state_dict())
    x, y = batch()
    a = vanilla(x, y, return_logits=True)
    b = latent(x, y, return_logits=True)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-6, rtol=0)
    assert b.mean_depth == 0
    assert a.flops["realised"] == pytest.approx(b.flops["realised"])
    # forward() hands l_max = 0 to vanilla's pass; the latent machinery agrees with it
    c, _ = latent.latent_forward(x, y, return_logits=True)
    torch.testing.assert_close(a.logits, c.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.loss, c.loss, atol=1e-6, rtol=0)
    assert c.mean_depth == 0
    assert a.flops["realised"] == pytest.approx(c.flops["realised"])


def test_pruning_lowers_depth_and_realised_flops(build):
    x, y = batch(b=4, s=32)
    outs = {}
    for tau in (0.05, 0.5):
        model = build(halting={"tau": tau})
        spread_router(model)
        outs[tau] = model(x, y)
    fixed = build(method="fixed")(x, y)
    assert fixed.mean_depth == 3
    assert outs[0.5].mean_depth < outs[0.05].mean_depth <= 3
    assert outs[0.5].flops["realised"] < outs[0.05].flops["realised"]
    assert outs[0.5].flops["executed_passes"] < fixed.flops["executed_passes"]
    # nominal = 6 N * executed passes, consistent with the measured depth
    passes = (1 + outs[0.5].depth.float()).sum().item()
    assert outs[0.5].flops["executed_passes"] == pytest.approx(passes)


def test_adaptive_loss_trends_with_lambda_direction(build):
    """A larger lambda makes the gradient push the router towards stopping."""
    x, y = batch()
    pushes = []
    for lam in (0.0, 1.0):
        model = build(halting={"lambda": lam})
        out = model(x, y)
        out.loss.backward()
        pushes.append(model.router.steps[0].bias.grad.item())
    assert pushes[1] > pushes[0]  # gradient descent lowers the bias more: fewer steps


def test_state_dict_round_trip(build, tmp_path):
    model = build(halting={"router": "per_step"})
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    fresh = build(seed=123, halting={"router": "per_step"})
    x, y = batch()
    assert not torch.allclose(model(x, y).loss, fresh(x, y).loss)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    torch.testing.assert_close(
        model(x, y, return_logits=True).logits,
        fresh(x, y, return_logits=True).logits,
        atol=0,
        rtol=0,
    )


@pytest.mark.parametrize(
    "method", ["vanilla", "adaptive", "looped", "pause", "ponder", "fixed", "mor"]
)
def test_every_method_trains(build, method):
    model = build(method=method, l_max=2)
    x, y = batch(b=2, s=12)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(15):
        out = model(x, y)
        assert torch.isfinite(out.loss)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = first if first is not None else out.loss.item()
    assert out.loss.item() < first - 0.5
    expected_passes = 1 + (0 if method == "vanilla" else 2)
    if method not in ("adaptive", "mor"):
        assert out.flops["executed_passes"] == 2 * 12 * expected_passes


def test_token_depth_diagnostic_measures_the_step0_loss(build, tmp_path):
    """The difficulty the depth diagnostic uses is the cross-entropy of the ordinary pass: the
    same weights run as a plain (vanilla) model give the same per-token loss."""
    from alcot.model.diagnostics import token_depth, write_token_depth

    model = build(method="adaptive")
    spread_router(model)
    vanilla = build(method="vanilla")
    vanilla.load_state_dict(model.state_dict(), strict=False)
    x, y = batch(b=2, s=16)
    ce0, depth = token_depth(model, x, y)
    out = vanilla(x, y, return_logits=True)
    ce = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), y.flatten(), reduction="none")
    torch.testing.assert_close(ce0, ce.view_as(ce0), atol=1e-5, rtol=0)
    torch.testing.assert_close(depth, model(x, y).depth)
    assert depth.unique().numel() >= 2
    path = write_token_depth(model, [(x, y), (x, y)], tmp_path / "td.csv", max_tokens=40)
    lines = path.read_text().splitlines()
    assert lines[0] == "step0_loss,depth" and len(lines) == 41
    assert not list(tmp_path.glob("*.tmp"))


def _ponder_by_hand(model, x, accumulate: bool):
    """The published PonderLM recurrence written out: u(0) = s E[x]; for each pondering step
    u <- u + s * softmax(W f(u)) @ E (or, ``accumulate=False``, u = s E[x] + that); the
    prediction is W f(u) after the last step."""
    model.state.start_causal()
    s_, e = model.cfg.embed_scale, model.embedding.weight
    freqs = model._rope(x.shape[1])[:, None, None, :]
    emb = s_ * e[x].transpose(0, 1)
    u = emb
    for _ in range(model.cfg.l_max):
        p = torch.softmax(model._logits(model._pass(u, freqs)), -1)
        u = (u if accumulate else emb) + s_ * (p @ e)
    return model._logits(model._pass(u, freqs)).transpose(0, 1)


@pytest.mark.parametrize("update", ["accumulate", "reset"])
def test_ponder_follows_the_published_recurrence(build, update):
    model = build(method="ponder", ponder_update=update)
    x, _ = batch(b=2, s=10)
    with torch.no_grad():
        out = model(x, return_logits=True)
        torch.testing.assert_close(out.logits, _ponder_by_hand(model, x, update == "accumulate"))
        other = _ponder_by_hand(model, x, update != "accumulate")
    assert not torch.allclose(out.logits, other, atol=1e-4)  # the two readings differ


@pytest.mark.parametrize("method", ["pause", "ponder", "adaptive", "vanilla"])
def test_every_input_embedding_takes_the_embed_scale(build, method):
    """Token embeddings, pause vectors and PonderLM's expected embedding all enter as s * E:
    a model with scale 2 equals one with scale 1 whose embedding and pause vectors are doubled
    (the LM head is separate, so nothing else changes)."""
    a = build(method=method, l_max=2, embed_scale=2.0)
    b = build(method=method, l_max=2, embed_scale=1.0)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        b.embedding.weight.mul_(2.0)
        if b.pause is not None:
            b.pause.mul_(2.0)
    x, y = batch(b=2, s=10)
    with torch.no_grad():
        oa, ob = a(x, y, return_logits=True), b(x, y, return_logits=True)
    torch.testing.assert_close(oa.logits, ob.logits, atol=1e-5, rtol=1e-5)


def test_zero_router_init_starts_every_token_at_the_bias(build):
    model = build(halting={"router_init": "zero", "init_continue": 0.9})
    x, _ = batch(b=2, s=12)
    with torch.no_grad():
        _, trace = model.latent_forward(x, keep_states=True)
        g = model.router(trace.hidden[0], 0)
    torch.testing.assert_close(g, torch.full_like(g, 0.9))
    normal = build(halting={"init_continue": 0.9})
    with torch.no_grad():
        _, trace = normal.latent_forward(x, keep_states=True)
        g = normal.router(trace.hidden[0], 0)
    assert g.std() > 1e-3


@pytest.mark.parametrize("detach", [False, True])
def test_detached_router_input_keeps_the_adaptive_loss_off_the_backbone(build, detach):
    model = build(halting={"detach_router_input": detach, "tau": 0.3})
    spread_router(model)
    x, y = batch()
    out = model(x, y)
    out.adapt_loss.backward()
    backbone = [p.grad for n, p in model.named_parameters() if n.startswith("block.")]
    touched = any(g is not None and g.abs().sum() > 0 for g in backbone)
    assert touched is not detach
    assert model.router.steps[0].weight.grad.abs().sum() > 0
