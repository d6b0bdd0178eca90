import pytest
import torch
from conftest import spread_router

from alcot.model.generate import generate


@pytest.mark.parametrize(
    "overrides",
    [
        dict(method="adaptive"),
        dict(method="adaptive", mix="distribution"),
        dict(method="adaptive", halting={"router": "per_step", "tau": 0.3}),
        dict(method="fixed"),
        dict(method="vanilla"),
        dict(method="looped"),
        dict(method="pause", l_max=2),
        dict(method="ponder", l_max=2),
        dict(method="ponder", l_max=2, ponder_update="reset"),
    ],
)
def test_cached_decoding_matches_full_forward(build, overrides):
    halting = {"tau": 0.3, **overrides.pop("halting", {})}
    model = build(halting=halting, **overrides)
    if model.router is not None:
        spread_router(model)
    prompt = torch.randint(0, 128, (3, 7), generator=torch.Generator().manual_seed(3))
    n = 10
    gen = generate(model, prompt, n)
    assert gen.tokens.shape == (3, 7 + n) and torch.equal(gen.tokens[:, :7], prompt)
    model.eval()
    with torch.no_grad():
        full = model(gen.tokens, return_logits=True)
    torch.testing.assert_close(gen.logits, full.logits[:, 6 : 6 + n], atol=1e-5, rtol=0)
    assert torch.equal(gen.depth, full.depth)
    assert torch.equal(gen.tokens[:, 7:], gen.logits.argmax(-1))  # greedy
    if model.cfg.method == "adaptive":
        assert len(torch.unique(gen.depth[:, 7:])) >= 2  # halting really varies per token


def test_sampling_is_reproducible_with_a_generator(build):
    model = build()
    prompt = torch.randint(0, 128, (2, 4))
    a = generate(
        model, prompt, 6, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(0)
    )
    b = generate(
        model, prompt, 6, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(a.tokens, b.tokens)


def test_generation_refuses_to_run_past_max_seq_len(build):
    model = build(max_seq_len=16)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, torch.zeros(1, 10, dtype=torch.long), 10)


@pytest.mark.parametrize("method", ["adaptive", "vanilla", "ponder", "mor"])
def test_zero_new_tokens_returns_the_prompt(build, method):
    model = build(method=method, halting={"tau": 0.3})
    prompt = torch.randint(0, 128, (2, 5))
    gen = generate(model, prompt, 0)
    assert torch.equal(gen.tokens, prompt)
    assert gen.depth.shape == (2, 5) and gen.logits.shape == (2, 0, 128)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, prompt, -1)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(method="adaptive"),
        dict(method="adaptive", mix="distribution"),
        dict(method="fixed"),
        dict(method="vanilla"),
        dict(method="mor"),
    ],
)
def test_static_decoding_equals_step_skipping_decoding(build, overrides):
    """Static decoding (fixed shapes, every row through every step, no host reads) gives the
    tokens, logits and depths of the decoder that skips the steps no row runs."""
    model = build(halting={"tau": 0.3}, **overrides)
    if model.router is not None:
        spread_router(model)
    prompt = torch.randint(0, 128, (3, 6), generator=torch.Generator().manual_seed(4))
    a = generate(model, prompt, 9, static=True)
    b = generate(model, prompt, 9, static=False)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.depth, b.depth)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)
    if model.cfg.method == "adaptive":
        assert len(torch.unique(a.depth[:, 6:])) >= 2


def test_cuda_graph_decoding_is_refused_off_cuda(build):
    model = build()
    with pytest.raises(ValueError, match="CUDA"):
        generate(model, torch.zeros(1, 4, dtype=torch.long), 2, static=True, cuda_graph=True)
