"""Activation recompute (Megatron's, ``model.recompute``) changes memory, never the numbers.

A recomputed layer runs its forward again in backward. For a latent pass that means writing its
keys/values into the shared cache again (the same values into the same slots: the pass travels
with the call) and attending again; the gradients of the cache still reach every earlier step.
"""

import pytest
import torch
from conftest import spread_router

METHODS = ["vanilla", "looped", "pause", "ponder", "fixed", "adaptive", "mor"]


def _grads(build, method, **kw):
    model = build(method=method, num_layers=3, halting={"tau": 0.3}, **kw)
    if model.router is not None:
        spread_router(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 128, (3, 20), generator=g)
    y = torch.randint(0, 128, (3, 20), generator=g)
    out = model(x, y)
    out.loss.backward()
    return out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "recompute",
    [
        {"recompute": "full"},
        {"recompute": "full", "recompute_num_layers": 3},
        {"recompute": "full", "recompute_method": "block", "recompute_num_layers": 2},
        {"recompute": "selective"},
    ],
)
@pytest.mark.parametrize("method", METHODS)
def test_recompute_gives_equal_loss_and_gradients(build, method, recompute):
    ref, g_ref = _grads(build, method)
    out, g = _grads(build, method, **recompute)
    if method in ("adaptive", "mor"):
        assert len(torch.unique(ref.depth)) >= 2
    assert torch.equal(out.depth, ref.depth)
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-6)
    assert set(g) == set(g_ref)
    for name, grad in g_ref.items():
        torch.testing.assert_close(g[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_recompute_saves_memory(build):
    """Full recompute of every layer keeps only each layer's input for backward."""
    from alcot.model.memory import saved_bytes

    def saved(**kw):
        model = build(method="fixed", num_layers=3, **kw)
        x = torch.randint(0, 128, (3, 20))
        return saved_bytes(model, x, x)

    assert saved(recompute="full") < 0.6 * saved()
