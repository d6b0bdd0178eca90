"""Realised FLOPs against torch's FlopCounterMode.

The counter sees every matmul the model really runs, and, through the formula given it for the
CPU attention kernel, the attention work the kernel is called with: the whole score matrix of a
masked call (what ``flops["kernel"]`` claims), the causal triangle of a causal one. Realised
attention counts only the (query, key) pairs the method attends to; for the latent methods it is
checked against a count from the executed depths alone (key (t', j) is visible to query (t, k)
iff t' <= t, j <= k, and t' ran step j; Mixture-of-Recursions: j == k).
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
    if attn_mask is not None:  # the kernel computes every score, masked or not
        return b * heads * sq * sk
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


@pytest.mark.parametrize(
    "method, masked",
    [
        ("vanilla", False),
        ("fixed", False),
        ("looped", False),
        ("pause", False),
        ("ponder", False),
        ("adaptive", False),
        ("adaptive", True),
        ("mor", False),
    ],
)
def test_realised_flops_match_flop_counter(build, method, masked):
    model = build(
        method=method, num_query_groups=4, hidden_size=128, vocab_size=256, halting={"tau": 0.3}
    )
    if model.router is not None:
        spread_router(model)  # so that tokens really halt at different depths
    x = torch.randint(0, 256, (2, 24))
    y = torch.randint(0, 256, (2, 24))
    mask = (torch.arange(24) % 3 != 0).float().expand(2, 24) if masked else None
    with (
        sdpa_kernel(SDPBackend.FLASH_ATTENTION),
        FlopCounterMode(display=False, custom_mapping=MAPPING) as counter,
    ):
        out = model(x, y, loss_mask=mask)
        out.loss.backward()
    if model.router is not None or method == "mor":
        assert len(torch.unique(out.depth)) >= 2
    counts = counter.get_flop_counts()["Global"]
    assert counts.get(aten._scaled_dot_product_flash_attention_for_cpu, 0) > 0, counts
    total = counter.get_total_flops()
    assert out.flops["kernel"] == pytest.approx(total, rel=0.02)
    # each side on its own: matmuls and attention
    matmul = counts.get(aten.mm, 0) + counts.get(aten.addmm, 0) + counts.get(aten.bmm, 0)
    assert out.flops["realised_matmul"] == pytest.approx(matmul, rel=0.02)
    kernel_attn = total - matmul
    kernel_side = out.flops["kernel"] - out.flops["realised_matmul"]
    assert kernel_side == pytest.approx(kernel_attn, rel=1e-6)
    cfg = model.cfg
    per_pair = 3 * cfg.num_layers * 4 * cfg.num_attention_heads * cfg.head_dim
    if method in ("adaptive", "fixed", "mor"):
        pairs = _latent_pairs(out.depth, same_step=method == "mor")
        assert out.flops["realised_attention"] == per_pair * pairs
        assert out.flops["realised_attention"] <= kernel_attn
    else:  # causal passes: the kernel's triangle is the method's
        assert out.flops["realised_attention"] == pytest.approx(kernel_attn, rel=1e-6)


def _latent_pairs(depth: torch.Tensor, same_step: bool) -> int:
    """(query, key) pairs of a latent forward, from the executed depths [b, s] alone."""
    pairs = 0
    for row in depth:
        for k in range(int(row.max()) + 1):
            ran_k = row >= k
            for t in torch.nonzero(ran_k)[:, 0].tolist():
                steps = [k] if same_step else range(k + 1)
                pairs += sum(int((row[: t + 1] >= j).sum()) for j in steps)
    return pairs


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


def test_adaptive_loss_runs_the_head_only_where_it_is_used(build):
    """sg(q_t(k)[y_t]) is read only for tokens that continue past step k inside the loss mask:
    the head runs (without grad) for exactly those, plus once with grad for the mixed state."""
    model = build(halting={"tau": 0.3})
    spread_router(model)
    b, s = 2, 24
    x, y = torch.randint(0, 128, (b, s)), torch.randint(0, 128, (b, s))
    mask = (torch.arange(s) % 2 == 0).float().expand(b, s)
    _, trace = model.latent_forward(x)
    used = sum(int((ran & (mask > 0)).sum()) for ran in trace.ran[1:])  # continued past k-1
    out = model(x, y, loss_mask=mask)
    per_token = 2 * model.cfg.hidden_size * model.cfg.vocab_size
    assert 0 < used < b * s * model.cfg.l_max
    assert out.flops["realised_head"] == per_token * (3 * b * s + used)
    # without labels the adaptive loss is not computed and the head runs once
    assert model(x).flops["realised_head"] == per_token * 3 * b * s


def test_paper_flops_reproduce_the_papers_table():
    """The paper's 2.18e20 for vanilla 1.4B on 26B tokens is 6 x total params x tokens."""
    from alcot.model import ModelConfig
    from alcot.model.flops import nominal_flops, paper_flops

    tokens = 26e9
    vanilla = ModelConfig.from_dict({"size": "1.4b", "method": "vanilla"})
    fixed = ModelConfig.from_dict({"size": "1.4b", "method": "fixed", "l_max": 3})
    assert paper_flops(vanilla, tokens) == pytest.approx(2.18e20, rel=0.02)
    assert paper_flops(fixed, tokens * 4) == pytest.approx(4 * paper_flops(vanilla, tokens))
    assert nominal_flops(vanilla, tokens) == pytest.approx(1.89e20, rel=0.01)


def test_forward_reports_paper_flops(build):
    from alcot.model import count_parameters

    model = build(method="fixed", l_max=2)
    out = model(torch.randint(0, 128, (2, 8)), torch.randint(0, 128, (2, 8)))
    assert out.flops["paper"] == 6 * count_parameters(model.cfg)["total"] * 16 * 3
