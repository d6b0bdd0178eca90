"""bf16 (Megatron's way: bf16 parameters, fp32 main weights) against fp32, on CPU.

Tolerances. bf16 keeps 8 significant bits: one rounding is off by at most 2^-9 (0.2 %) relative.
A forward rounds every activation a few times per layer, so the loss, a mean over hundreds of
tokens, moves by well under 1 % relative (measured: at most 0.004 % with these small models);
0.5 % is required. Gradients are compared by cosine similarity per
parameter tensor (bf16 rounding is noise of a few tenths of a percent per element, far below
the signal): measured at least 0.9999 for every backbone tensor; 0.99 is required. The
halting router's weight gradient is the exception (measured 0.88-0.97 over eight
initialisations, both mixings): it sums, over tokens,
the hidden state times how much the loss prefers one step's state to the next, and those
differences between steps are small next to the states, so the states' bf16 rounding shows up
far more; 0.85 is required there (the router itself computes in fp32). Depth: the router runs
in fp32 on bf16 hidden states, so only a token sitting on tau may change depth (measured: none
of 96); at least 90 % must agree.
"""

import pytest
import torch
from conftest import small_run, spread_router

from alcot.model.generate import generate
from alcot.model.precision import MainParams, cast_model

METHODS = ["vanilla", "looped", "pause", "ponder", "fixed", "adaptive", "mor"]


def _pair(build, method, **kw):
    ref = build(method=method, halting={"tau": 0.3}, **kw)
    if ref.router is not None:
        spread_router(ref)
    low = build(method=method, halting={"tau": 0.3}, **kw)  # same seed: same weights
    low.load_state_dict(ref.state_dict())
    return ref, cast_model(low, torch.bfloat16)


@pytest.mark.parametrize(
    "method, mix",
    [(m, "state") for m in METHODS] + [("adaptive", "distribution"), ("fixed", "distribution")],
)
def test_bf16_forward_backward_agree_with_fp32(build, method, mix):
    ref, low = _pair(build, method, mix=mix)
    assert low.embedding.weight.dtype == torch.bfloat16
    if low.router is not None:
        assert all(p.dtype == torch.float32 for p in low.router.parameters())
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 128, (4, 24), generator=g)
    y = torch.randint(0, 128, (4, 24), generator=g)
    outs = {}
    for name, model in (("fp32", ref), ("bf16", low)):
        out = model(x, y, return_logits=True)
        out.loss.backward()
        outs[name] = out
    a, b = outs["fp32"], outs["bf16"]
    assert b.loss.dtype == torch.float32 and b.logits.dtype == torch.float32
    assert torch.isfinite(b.loss)
    assert (a.depth == b.depth).float().mean() >= 0.9
    assert b.loss.item() == pytest.approx(a.loss.item(), rel=0.005)
    assert b.ce_loss.item() == pytest.approx(a.ce_loss.item(), rel=0.005)
    for (name, p), q in zip(ref.named_parameters(), low.parameters(), strict=True):
        if p.grad is None:
            assert q.grad is None or not q.grad.any(), name
            continue
        assert q.grad is not None and q.grad.dtype == q.dtype, name
        cos = torch.nn.functional.cosine_similarity(
            p.grad.flatten(), q.grad.float().flatten(), dim=0
        )
        assert cos >= (0.85 if name.startswith("router.") else 0.99), (name, float(cos))


@pytest.mark.parametrize("method", ["vanilla", "fixed", "adaptive", "mor"])
def test_bf16_cached_generation(build, method):
    """Cached decoding in bf16 reproduces a bf16 full forward over the generated text, and the
    fp32 model's logits on the same text within bf16's tolerance."""
    ref, low = _pair(build, method)
    low.eval()
    ref.eval()
    prompt = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(3))
    gen = generate(low, prompt, 10)
    assert gen.logits.dtype == torch.float32 and torch.isfinite(gen.logits).all()
    with torch.no_grad():
        full = low(gen.tokens, return_logits=True)
        full32 = ref(gen.tokens, return_logits=True)
    new = slice(prompt.shape[1] - 1, gen.tokens.shape[1] - 1)
    assert torch.equal(gen.depth, full.depth)
    scale = full.logits.abs().max()
    assert (gen.logits - full.logits[:, new]).abs().max() <= 0.02 * scale
    assert (gen.logits - full32.logits[:, new]).abs().max() <= 0.05 * full32.logits.abs().max()


def test_main_params_accumulate_in_fp32(build):
    """Micro-batch gradients add up in fp32 on the main copies; the step rounds back to bf16."""
    model = cast_model(build(method="fixed"), torch.bfloat16)
    main = MainParams(list(model.parameters()))
    assert main.reduced
    w = model.embedding.weight
    w.grad = torch.full_like(w, 1.0)
    main.accumulate()
    w.grad = torch.full_like(w, 2.0**-9)  # lost if added to 1.0 in bf16
    main.accumulate()
    assert w.grad is None
    assert main.main_of(w).grad.dtype == torch.float32
    assert torch.all(main.main_of(w).grad == 1.0 + 2.0**-9)
    with torch.no_grad():
        main.main_of(w).add_(1.0)
    main.copy_to_model()
    assert w.dtype == torch.bfloat16
    assert torch.equal(w, (main.main_of(w).detach()).to(torch.bfloat16))


def test_every_backward_call_accumulates_into_fp32(build):
    """Several backward calls before the optimizer step (micro-batches, and the pipeline
    schedule's one call per latent step and micro-batch): each call's bf16 gradient lands in
    the fp32 main gradient at once, so the running sum is never rounded to bf16."""
    model = cast_model(build(method="fixed"), torch.bfloat16)
    main = MainParams(list(model.parameters()))
    w = model.embedding.weight
    for scale in (1.0, 2.0**-9, 2.0**-9):  # 1 + 2^-8 rounds to 1 in bf16 (ties to even)
        (w.float().sum() * scale).backward()
        assert w.grad is None  # moved to the main gradient by the hook
    assert torch.all(main.main_of(w).grad == 1.0 + 2.0**-8)
    plain = cast_model(build(method="fixed"), torch.bfloat16)  # without MainParams: bf16 sums
    v = plain.embedding.weight
    for scale in (1.0, 2.0**-9, 2.0**-9):
        (v.float().sum() * scale).backward()
    assert torch.all(v.grad == 1.0)


@pytest.mark.parametrize("method", ["adaptive", "ponder"])
def test_trainer_runs_and_resumes_exactly_in_bf16(tmp_path, alcot_home, method):
    """Six bf16 steps straight through, and three + three from the step-3 checkpoint: the
    resumed losses are the same numbers (fp32 main weights and optimizer state are saved)."""
    import shutil

    from alcot.data import prepare
    from alcot.model.trainer import Callback, train

    def run(out_dir, steps):
        cfg = small_run(
            out_dir,
            f"model.method={method}",
            "train.precision=bf16",
            f"train.steps={steps}",
            "train.checkpoint_every=3",
            "train.eval_every=3",
        )
        data = prepare(cfg.data, alcot_home / "cache", log=lambda *_: None)
        seen = {}

        class Rec(Callback):
            def on_step_end(self, step, metrics):
                seen[step] = metrics

        res = train(
            cfg.model, data, cfg.train, cfg.seed, out_dir, cfg.data.seq_len, [Rec()], progress=False
        )
        assert res.status == "finished", res.message
        return seen, res

    full, res = run(tmp_path / "full", 6)
    assert all(torch.isfinite(torch.tensor(m["train/loss"])) for m in full.values())
    assert full[6]["train/loss"] < full[1]["train/loss"]
    assert full[6]["flops/kernel"] >= full[6]["flops/realised"] > 0
    payload = torch.load(res.checkpoint / "tp0.pt", weights_only=True)
    assert payload["model"]["embedding.weight"].dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in payload["main_params"])

    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        tmp_path / "full" / "checkpoints" / "step_00000003", part / "checkpoints" / "step_00000003"
    )
    resumed, _ = run(part, 6)
    assert set(resumed) == {4, 5, 6}
    for step in (4, 5, 6):
        assert resumed[step]["train/loss"] == full[step]["train/loss"], step
