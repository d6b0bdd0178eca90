"""``alcot export --hf``: a transformers model folder (remote code) for every method, with the
same logits and depths as alcot, generation through ``generate()``, and lm-eval's ``hf`` model."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import yaml

from alcot.orchestrator.cli import main
from tests.conftest import spread_router, tiny_config

METHODS = [
    ("adaptive", {}),
    ("adaptive", {"mix": "distribution", "halting": {"router": "mlp"}}),
    ("adaptive", {"halting": {"router": "per_step"}, "embed_scale": 8.0}),
    ("fixed", {}),
    ("vanilla", {}),
    ("looped", {"l_max": 2}),
    ("pause", {"l_max": 2}),
    ("ponder", {"l_max": 2}),
    ("ponder", {"l_max": 2, "ponder_update": "reset"}),
    ("mor", {"l_max": 3, "mor": {"threshold": 0.5}}),
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from alcot.data.corpus import builtin_documents
    from alcot.data.tokenizer import train_bpe

    tok = train_bpe(builtin_documents(200), 256)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def make_run(folder, tokenizer, method, extra, parallel):
    """A run folder as training leaves it (config.yaml, a checkpoint, tokenizer.json), with
    random weights that make tokens halt at different depths."""
    import shutil

    from alcot.model import checkpoints
    from alcot.model.network import AlcotModel
    from alcot.orchestrator.config import RunConfig

    halting = {"tau": 0.3, **extra.get("halting", {})}
    rest = {k: v for k, v in extra.items() if k != "halting"}
    cfg = tiny_config(method=method, vocab_size=320, halting=halting, **rest)
    torch.manual_seed(0)
    model = AlcotModel(cfg)
    if model.router is not None:
        spread_router(model, std=0.5)
    folder.mkdir(parents=True)
    run = RunConfig.from_dict({"data": {"seq_len": 48}, "tracking": {"enabled": False}})
    run = dataclasses.replace(run, model=cfg)
    (folder / "config.yaml").write_text(yaml.safe_dump(run.to_dict(), sort_keys=False))
    shutil.copy(tokenizer, folder / "tokenizer.json")
    checkpoints.save(folder / "checkpoints", 1, {"model": model.state_dict()}, {}, keep=1)
    return model


@pytest.mark.parametrize(
    ("method", "extra"), METHODS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(METHODS)]
)
def test_export_round_trip(tmp_path, tokenizer, parallel, method, extra):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alcot.model.generate import generate

    run = tmp_path / "run"
    model = make_run(run, tokenizer, method, extra, parallel)
    out = tmp_path / "hf"
    assert main(["export", str(run), "--hf", str(out)]) == 0
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out)
    hf.eval()
    model.eval()
    text = ["Mia went to the garden with 7 red apples. There Mia met Leo.", "three plus four is"]
    ids = [tok(t)["input_ids"] for t in text]
    assert ids[0] == json.loads(json.dumps(model_ids(run, text[0])))
    x = torch.tensor([ids[0][:16], ids[1][:4] + ids[0][:12]])
    with torch.no_grad():
        ours = model(x, return_logits=True)
        theirs = hf(x)
    assert (ours.logits - theirs.logits).abs().max().item() < 1e-4
    assert torch.equal(ours.depth, theirs.depth)
    if method == "adaptive":
        assert ours.depth.unique().numel() > 1  # per-token halting is exercised

    prompt = torch.tensor([ids[0][:10]])
    ref = generate(model, prompt, 8)
    got = hf.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert torch.equal(got, ref.tokens)


def model_ids(run, text):
    from alcot.data.tokenizer import load_tokenizer

    return load_tokenizer(run / "tokenizer.json").encode(text).ids


def test_export_refuses_a_non_empty_folder(tmp_path, tokenizer, parallel, capsys):
    run = tmp_path / "run"
    make_run(run, tokenizer, "vanilla", {}, parallel)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(run), "--hf", str(out)]) == 2
    assert str(out) in capsys.readouterr().err


def test_lm_eval_hf_model_scores_like_alcot(tmp_path, tokenizer, parallel, monkeypatch):
    import lm_eval

    from alcot.orchestrator.evaluation.lmeval_tasks import task_manager
    from alcot.orchestrator.evaluation.loading import load_run
    from alcot.orchestrator.evaluation.suite import EvalSpec, run_eval
    from tests.test_eval import FIXTURES

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = tmp_path / "run"
    make_run(run, tokenizer, "adaptive", {}, parallel)
    out = tmp_path / "hf"
    assert main(["export", str(run), "--hf", str(out)]) == 0
    spec = EvalSpec(tasks=["arc_easy"], data_dir=FIXTURES, limit=6)
    ours = run_eval(load_run(run), spec, log=lambda *a: None)["budgets"][0]["tasks"]
    res = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(out), "trust_remote_code": True, "dtype": "float32"},
        tasks=["alcot_arc_easy"],
        device="cpu",
        limit=6,
        task_manager=task_manager(["alcot_arc_easy"], FIXTURES),
        log_samples=False,
        bootstrap_iters=1000,
    )
    theirs = res["results"]["alcot_arc_easy"]
    for metric in ("acc", "acc_norm"):
        assert theirs[f"{metric},none"] == pytest.approx(ours["alcot_arc_easy"][metric])


@pytest.mark.parametrize(
    ("method", "extra"), METHODS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(METHODS)]
)
def test_export_cached_decoding_equals_the_full_forward(tmp_path, tokenizer, parallel, method,
                                                        extra):  # fmt: skip
    """The exported model's KV cache: a prompt then one token at a time gives the logits and
    depths of one forward over the whole text, and generate() (cached) the tokens of
    generate(use_cache=False)."""
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    make_run(run, tokenizer, method, extra, parallel)
    out = tmp_path / "hf"
    assert main(["export", str(run), "--hf", str(out)]) == 0
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    hf.eval()
    x = torch.randint(0, 320, (2, 14), generator=torch.Generator().manual_seed(2))
    if method != "pause":  # pause tokens have no cache: generate() recomputes the text
        with torch.no_grad():
            full = hf(x)
            step = hf(x[:, :6], use_cache=True)
            logits, depth = [step.logits], [step.depth]
            for t in range(6, 14):
                step = hf(x[:, t : t + 1], cache=step.cache)
                logits.append(step.logits)
                depth.append(step.depth)
        assert torch.equal(torch.cat(depth, 1), full.depth)
        torch.testing.assert_close(torch.cat(logits, 1), full.logits, atol=1e-4, rtol=0)
        assert step.cache.length == 14
        if method == "adaptive":
            assert full.depth.unique().numel() > 1
    prompt = x[:1, :7]
    cached = hf.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=None)
    plain = hf.generate(
        prompt, max_new_tokens=6, do_sample=False, eos_token_id=None, use_cache=False
    )
    assert torch.equal(cached, plain)


def test_export_loads_in_bf16(tmp_path, tokenizer, parallel):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    make_run(run, tokenizer, "adaptive", {}, parallel)
    out = tmp_path / "hf"
    assert main(["export", str(run), "--hf", str(out)]) == 0
    ref = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.bfloat16)
    assert hf.block.layers[0].mlp.linear_fc1.weight.dtype == torch.bfloat16
    assert hf.router.steps[0].weight.dtype == torch.float32  # halting stays in fp32
    x = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = ref(x), hf(x)
    assert torch.isfinite(b.logits).all()
    assert (a.logits.softmax(-1) - b.logits.float().softmax(-1)).abs().max() < 0.05
    got = hf.generate(x[:, :6], max_new_tokens=4, do_sample=False, eos_token_id=None)
    assert got.shape == (1, 10)
