"""Realised FLOPs against torch's FlopCounterMode.

The counter sees every matmul the model really runs. For attention it would count the dense
score matrix; realised FLOPs count only the (query, key) pairs the mask lets through. So the
counter is given a formula for the CPU attention kernel that reads the mask the kernel is
actually called with: both sides then measure the same thing, from independent sources.
"""

import pytest
import torch
from conftest import spread_router
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten


def _pairs(query, key, is_causal, attn_mask):
    b, heads, sq, _ = query.shape
    sk = key.shape[2]
    if attn_mask is not None:  # the kernel gets an additive mask: 0 = attend, -inf = masked
        allowed = attn_mask if attn_mask.dtype == torch.bool else torch.isfinite(attn_mask)
        return int(allowed.expand(b, heads, sq, sk).sum())
    if is_causal:
        return b * heads * sq * (sq + 1) // 2
    return b * heads * sq * sk


def _fwd(
    query,
    key,
    value,
    dropout_p=0.0,
    is_causal=False,
    *,
    attn_mask=None,
    scale=None,
    out_val=None,
    **_,
):
    return 4 * query.shape[-1] * _pairs(query, key, is_causal, attn_mask)


def _bwd(
    grad_out,
    query,
    key,
    value,
    out,
    lse,
    dropout_p,
    is_causal,
    *,
    attn_mask=None,
    scale=None,
    out_val=None,
    **_,
):
    return 8 * query.shape[-1] * _pairs(query, key, is_causal, attn_mask)


_fwd._get_raw = True
_bwd._get_raw = True
MAPPING = {
    aten._scaled_dot_product_flash_attention_for_cpu: _fwd,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _bwd,
}


@pytest.mark.parametrize("method", ["vanilla", "fixed", "looped", "pause", "ponder", "adaptive"])
def test_realised_flops_match_flop_counter(build, method):
    model = build(
        method=method, num_query_groups=4, hidden_size=128, vocab_size=256, halting={"tau": 0.3}
    )
    if model.router is not None:
        spread_router(model)  # so that tokens really halt at different depths
    x = torch.randint(0, 256, (2, 24))
    y = torch.randint(0, 256, (2, 24))
    with (
        sdpa_kernel(SDPBackend.FLASH_ATTENTION),
        FlopCounterMode(display=False, custom_mapping=MAPPING) as counter,
    ):
        out = model(x, y)
        out.loss.backward()
    if model.router is not None:
        assert len(torch.unique(out.depth)) >= 2
    counts = counter.get_flop_counts()["Global"]
    assert counts.get(aten._scaled_dot_product_flash_attention_for_cpu, 0) > 0, counts
    total = counter.get_total_flops()
    assert out.flops["realised"] == pytest.approx(total, rel=0.02)
    # each side on its own: matmuls and attention
    matmul = counts.get(aten.mm, 0) + counts.get(aten.addmm, 0) + counts.get(aten.bmm, 0)
    assert out.flops["realised_matmul"] == pytest.approx(matmul, rel=0.02)
    attn = total - matmul  # the pairs the masks handed to the kernel allow, pruned or not
    assert out.flops["realised_attention"] == pytest.approx(attn, rel=1e-6)


def test_attention_counts_attended_pairs_analytically(build):
    """fixed depth l_max=3: step k attends to (k+1) causal triangles."""
    model = build(method="fixed", hidden_size=64)
    b, s = 2, 10
    out = model(torch.randint(0, 128, (b, s)), torch.randint(0, 128, (b, s)))
    cfg = model.cfg
    pairs = sum((k + 1) * b * s * (s + 1) // 2 for k in range(cfg.l_max + 1))
    expected = 3 * cfg.num_layers * 4 * cfg.hidden_size * pairs
    assert out.flops["realised_attention"] == expected


def test_nominal_flops_follow_kaplan(build):
    from alcot.model import count_parameters

    model = build(method="looped", l_max=3)
    out = model(torch.randint(0, 128, (2, 8)), torch.randint(0, 128, (2, 8)))
    n = count_parameters(model.cfg)["non_embedding"]
    assert out.flops["nominal"] == 6 * n * 16 * 4
