"""The latent caches and the attention kernel behind them (model/layers.py).

Efficient == naive (tests/test_model.py) already pins the numbers; these pin the structure the
GPU path relies on: one kernel call per layer per latent step for the whole batch, caches that
are written in place and not kept after a training forward, decoding that never reallocates
them, and the FlexAttention kernel agreeing with SDPA.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import spread_router

from alcot.model import layers
from alcot.model.generate import generate

V = 128


def batch(b=3, s=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (b, s), generator=g), torch.randint(0, V, (b, s), generator=g)


@pytest.mark.parametrize("method", ["fixed", "adaptive", "mor"])
def test_one_kernel_call_per_layer_per_step(build, method, monkeypatch):
    model = build(method=method, halting={"tau": 0.3})
    if model.router is not None:
        spread_router(model)
    calls = []
    real = F.scaled_dot_product_attention

    def counting(q, k, v, **kw):
        calls.append((q.shape[0], q.shape[2], k.shape[2]))
        return real(q, k, v, **kw)

    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", counting)
    x, y = batch(b=4)
    out = model(x, y)
    out.loss.backward()
    steps = int(out.depth.max()) + 1
    if method != "fixed":
        assert len(torch.unique(out.depth)) >= 2
    assert len(calls) == model.cfg.num_layers * steps  # forward; backward recomputes nothing
    assert all(b == 4 for b, _, _ in calls)  # every row in one call


def test_training_forward_keeps_no_cache(build):
    model = build(method="adaptive", halting={"tau": 0.3})
    spread_router(model)
    x, y = batch()
    out = model(x, y)
    assert model.kv is None
    out.loss.backward()
    assert model.kv is None


def test_cache_slots_hold_what_each_pass_wrote(build):
    """Step k owns the region [k R, (k + 1) R) of the cache (R = sequence + decoding room);
    each row fills it from the front; a slot's (position, step) is that of the token whose keys
    it holds, and a token's keys are written once."""
    model = build(method="adaptive", halting={"tau": 0.3})
    spread_router(model)
    x, y = batch()
    with torch.no_grad():
        out, trace = model.latent_forward(x, y, keep_cache=0 + 1)
    kv = model.kv
    model.kv = None
    region = x.shape[1] + 1
    assert kv.region == region
    filled = kv.slot_step >= 0
    assert int(filled.sum()) == int(sum(r.sum() for r in trace.ran))
    for k, ran in enumerate(trace.ran):
        assert torch.equal(kv.fill[:, k], ran.sum(1))
        for row in range(x.shape[0]):
            mine = kv.slot_step[row] == k
            n = int(ran[row].sum())
            assert mine[k * region : k * region + n].all() and int(mine.sum()) == n
            got = kv.slot_pos[row][mine].sort().values
            assert torch.equal(got, ran[row].nonzero()[:, 0])
    layer0 = next(iter(kv.keys))
    assert kv.keys[layer0].shape[2] == kv.capacity == (1 + model.cfg.l_max) * region


@pytest.mark.parametrize("n,cap,expected", [(1, 128, 32), (32, 128, 32), (33, 128, 64),
                                            (65, 128, 128), (128, 128, 128), (5, 7, 7), (2, 7, 2),
                                            (1, 1, 1)])  # fmt: skip
def test_bucket(n, cap, expected):
    assert layers.bucket(n, cap) == expected


def test_attention_shapes_repeat_over_new_batches(parallel):
    """Adaptive at micro (seq 128, batch 8, l_max 3) with a spread router, 20 batches of new
    tokens: the latent attention sees a bounded set of shapes (a GPU kernel plan is built per
    shape), <= 1 + l_max * 3 buckets = 10, whatever the data. Without buckets (query width =
    max tokens per row, keys = the slots written so far) it was 55."""
    from alcot.model import AlcotModel, ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig.from_dict(
        {"size": "micro", "method": "adaptive", "l_max": 3, "halting": {"tau": 0.1}}
    )
    model = AlcotModel(cfg)
    spread_router(model, std=0.5)
    shapes, widths = set(), set()
    real = F.scaled_dot_product_attention

    def counting(q, k, v, **kw):
        shapes.add((tuple(q.shape), tuple(k.shape)))
        return real(q, k, v, **kw)

    g = torch.Generator().manual_seed(5)
    depths = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(layers.F, "scaled_dot_product_attention", counting)
        for _ in range(20):  # (backward runs no kernel call of its own: see the test above)
            x = torch.randint(0, cfg.vocab_size, (8, 128), generator=g)
            with torch.no_grad():
                out, trace = model.latent_forward(x, x)
            widths.update(int(r.sum(1).max()) for r in trace.ran)
            depths.append(out.depth)
    depth = torch.stack(depths)
    assert len(torch.unique(depth)) == cfg.l_max + 1  # tokens really halt at every depth
    assert len(widths) > 12  # the data bring many raw widths ...
    assert len(shapes) <= 12  # ... the kernels see few shapes
    assert len(shapes) <= 1 + cfg.l_max * 3


def test_decoding_writes_into_the_preallocated_cache(build, monkeypatch):
    model = build(method="adaptive", halting={"tau": 0.3})
    spread_router(model)
    buffers = set()
    real = layers.LatentKV.write

    def watching(self, layer, p, key, value):
        kb, vb = real(self, layer, p, key, value)
        buffers.add((layer, kb.data_ptr(), vb.data_ptr()))
        return kb, vb

    monkeypatch.setattr(layers.LatentKV, "write", watching)
    x, _ = batch(b=2, s=8)
    gen = generate(model, x, 12)
    assert gen.tokens.shape == (2, 20)
    assert len(buffers) == model.cfg.num_layers  # one buffer pair per layer, never reallocated
    assert model.kv is None  # released when generation ends


@pytest.mark.parametrize("method", ["fixed", "adaptive", "mor"])
def test_flex_kernel_agrees_with_sdpa(build, method):
    """FlexAttention has no CPU backward in torch 2.13: compared in evaluation here."""
    sdpa = build(method=method, halting={"tau": 0.3})
    flex = build(method=method, halting={"tau": 0.3}, attention_kernel="flex")
    if sdpa.router is not None:
        spread_router(sdpa)
    flex.load_state_dict(sdpa.state_dict())
    sdpa.eval()
    flex.eval()
    x, y = batch()
    with torch.no_grad():
        a = sdpa(x, y, return_logits=True)
        b = flex(x, y, return_logits=True)
    assert torch.equal(a.depth, b.depth)
    torch.testing.assert_close(b.logits, a.logits, atol=1e-4, rtol=1e-4)
    assert a.flops["realised"] == b.flops["realised"]
    assert b.flops["kernel"] >= b.flops["realised"]


@pytest.mark.parametrize("method", ["fixed", "adaptive", "mor"])
def test_per_pass_gradient_sums_equal_one_cache_wide_accumulator(build, method, monkeypatch):
    """The cache's key/value gradients are summed per pass over its own tokens; a single fp32
    accumulator over the whole cache (what they replace) gives bit-identical gradients."""

    def cache_wide(self, layer, p, dk, dv):
        if layer not in self.grads:
            shape = self.keys[layer].shape
            self.grads[layer] = (torch.zeros(shape), torch.zeros(shape))
        kg, vg = self.grads[layer]
        kg[:, :, p.begin : p.end] += dk
        vg[:, :, p.begin : p.end] += dv
        out = kg[p.rows, :, p.slots], vg[p.rows, :, p.slots]
        if p.index == 0:
            del self.grads[layer]
        return out

    grads = []
    for reference in (False, True):
        with monkeypatch.context() as mp:
            if reference:
                mp.setattr(layers.LatentKV, "grad_slots", cache_wide)
            model = build(method=method, halting={"tau": 0.3})
            if model.router is not None:
                spread_router(model)
            x, y = batch()
            model(x, y).loss.backward()
            grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
