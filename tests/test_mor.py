"""Mixture-of-Recursions: the packed path against the naive one, routing, causality, decoding."""

import pytest
import torch

from alcot.model.generate import generate
from alcot.model.reference import naive_mor_forward

V = 128


def batch(b=3, s=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (b, s), generator=g), torch.randint(0, V, (b, s), generator=g)


def spread(model, std=0.3, bias=0.0, seed=1):
    """Router weights with enough spread that tokens are kept at different depths; ``bias``
    moves the inference rule's keep rate."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lin in model.mor_router.steps:
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * std)
            lin.bias.fill_(bias)


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("training", [True, False])
def test_efficient_matches_naive_reference(build, training):
    model = build(method="mor", mor={"aux_weight": 0.5, "alpha": 0.7})
    spread(model)
    model.train(training)
    x, y = batch()
    out, trace = model.latent_forward(x, y, return_logits=True)
    out.loss.backward()
    g_fast = grads(model)
    model.zero_grad()
    loss, ce, aux, logits, depth = naive_mor_forward(model, x, y)
    loss.backward()
    g_ref = grads(model)

    assert len(torch.unique(out.depth)) >= 3, torch.bincount(out.depth.flatten())
    assert torch.equal(out.depth, depth)
    torch.testing.assert_close(out.logits, logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.adapt_loss, aux, atol=1e-6, rtol=0)
    assert out.adapt_loss > 0
    assert set(g_fast) == set(g_ref)
    assert any("mor_router" in n for n in g_fast)
    for name in g_fast:
        torch.testing.assert_close(g_fast[name], g_ref[name], atol=1e-5, rtol=0, msg=name)
    if training:  # expert choice keeps exactly the capacity of each row at every step
        s = x.shape[1]
        for k, cap in enumerate(model.cfg.mor.capacities(model.cfg.l_max), start=1):
            assert trace.ran[k].sum(1).tolist() == [int(cap * s)] * x.shape[0]


def test_default_capacity_is_the_papers_schedule(build):
    """N_r = l_max + 1 recursions, recursion r keeps (N_r - r + 1) / N_r: 1, 3/4, 2/4, 1/4."""
    model = build(method="mor")
    assert model.cfg.mor.capacities(3) == [0.75, 0.5, 0.25]
    x, y = batch(b=2, s=16)
    out = model(x, y)
    assert torch.bincount(out.depth.flatten(), minlength=4).tolist() == [8, 8, 8, 8]
    assert out.flops["executed_passes"] == 2 * 16 * 2.5


def test_recursion_changes_only_the_kept_tokens(build):
    model = build(method="mor")
    spread(model)
    x, _ = batch(b=2, s=12)
    with torch.no_grad():
        _, trace = model.latent_forward(x, keep_states=True)
    for k in range(1, len(trace.ran)):
        same = (trace.hidden[k] == trace.hidden[k - 1]).all(-1).t()  # [b, s]
        assert torch.equal(same, ~trace.ran[k])


def test_inference_routing_is_causal(build):
    model = build(method="mor")
    spread(model, bias=0.2)
    model.eval()
    x, _ = batch(b=2, s=16)
    t = 9
    x2 = x.clone()
    x2[:, t] = (x2[:, t] + 1) % V
    with torch.no_grad():
        a = model(x, return_logits=True)
        b = model(x2, return_logits=True)
    assert len(torch.unique(a.depth)) >= 2
    assert torch.equal(a.depth[:, :t], b.depth[:, :t])
    torch.testing.assert_close(a.logits[:, :t], b.logits[:, :t], atol=1e-6, rtol=0)
    assert not torch.allclose(a.logits[:, t:], b.logits[:, t:])


def test_expert_choice_in_training_looks_at_later_tokens(build):
    """The leak the inference rule exists for: in training, whether an early token runs a step
    depends on the scores of later tokens (top-k compares them), so changing only later tokens
    can change earlier depths."""
    model = build(method="mor")
    spread(model)
    x, _ = batch(b=1, s=16)
    t = 8
    with torch.no_grad():
        base = model(x).depth
        changed = False
        for seed in range(20):
            x2 = x.clone()
            x2[:, t:] = torch.randint(
                0, V, (1, 16 - t), generator=torch.Generator().manual_seed(seed)
            )
            if not torch.equal(model(x2).depth[:, :t], base[:, :t]):
                changed = True
                break
    assert changed


def test_cached_decoding_matches_full_forward(build):
    model = build(method="mor")
    spread(model, bias=0.2)
    prompt = torch.randint(0, V, (3, 7), generator=torch.Generator().manual_seed(3))
    n = 10
    gen = generate(model, prompt, n)
    assert model.training  # generate restores the mode; the full forward below needs eval
    model.eval()
    with torch.no_grad():
        full = model(gen.tokens, return_logits=True)
    torch.testing.assert_close(gen.logits, full.logits[:, 6 : 6 + n], atol=1e-5, rtol=0)
    assert torch.equal(gen.depth, full.depth)
    assert len(torch.unique(gen.depth[:, 7:])) >= 2


def test_mor_trains_and_its_router_learns_to_predict_top_k(build):
    """The auxiliary loss teaches each router's own probability to agree with expert choice:
    after training, the causal rule keeps mostly the tokens top-k keeps."""
    model = build(method="mor", l_max=2, mor={"aux_weight": 1.0})
    x, y = batch(b=4, s=16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        out = model(x, y)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = first if first is not None else (out.ce_loss.item(), out.adapt_loss.item())
    assert out.ce_loss.item() < first[0] - 0.5
    assert out.adapt_loss.item() < first[1]
    with torch.no_grad():
        _, train_trace = model.latent_forward(x)
        model.eval()
        _, eval_trace = model.latent_forward(x)
    agree = (train_trace.ran[1] == eval_trace.ran[1]).float().mean().item()
    assert agree > 0.8, agree


def test_capacity_must_fit_the_steps():
    from alcot.common.typed import ConfigError
    from alcot.model import ModelConfig

    with pytest.raises(ConfigError, match=r"model\.mor\.capacity"):
        ModelConfig.from_dict({"method": "mor", "l_max": 3, "mor": {"capacity": [0.5, 0.5]}})
    with pytest.raises(ConfigError, match=r"model\.mor\.capacity"):
        ModelConfig.from_dict({"method": "mor", "l_max": 2, "mor": {"capacity": [0.5, 0.6]}})
    with pytest.raises(ConfigError, match=r"model\.mor\.capacity\[1\]"):
        ModelConfig.from_dict({"method": "mor", "l_max": 2, "mor": {"capacity": [0.5, 0.0]}})
