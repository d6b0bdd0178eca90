"""Evaluation of finished runs (``alcot eval``), lm-eval integration, test-time budgets, the
depth view (``alcot generate``). One tiny adaptive run is trained once for the module."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from alcot.orchestrator.cli import main
from tests.conftest import small_run

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "evaldata"
VENV_BIN = Path(sys.executable).parent


def _val_documents(cfg) -> list[str]:
    """The documents training held out for validation (the split rule of the token cache)."""
    from alcot.data.sources import iter_documents

    docs = list(iter_documents(cfg.data))
    rng = random.Random(cfg.data.split_seed)
    is_val = [rng.random() < cfg.data.val_fraction for _ in docs]
    if all(is_val) or not any(is_val):
        is_val[0], is_val[-1] = True, False
    return [d for d, v in zip(docs, is_val, strict=True) if v]


def _pick_seq_len(alcot_home, run_dir) -> list[str]:
    """Settings whose validation split is a whole number of sequences, so that the training
    loop's validation (which drops a partial last window) reads every validation token."""
    from alcot.data.preparation import prepare

    for docs in range(300, 420, 7):
        cfg = small_run(run_dir, f"data.builtin_documents={docs}")
        data = prepare(cfg.data, alcot_home / "cache", log=lambda *a: None)
        for seq_len in range(24, 49):
            if (data.n_val - 1) % seq_len == 0:
                return [f"data.builtin_documents={docs}", f"data.seq_len={seq_len}"]
    raise AssertionError("no corpus size with a validation split of whole sequences")


@pytest.fixture(scope="module")
def trained(alcot_home, tmp_path_factory):
    from alcot.orchestrator.training_run import run_training

    run_dir = tmp_path_factory.mktemp("eval_run")
    extra = _pick_seq_len(alcot_home, run_dir)
    cfg = small_run(
        run_dir,
        *extra,
        "model.l_max=3",
        "model.halting.init_continue=0.6",
        "train.steps=30",
        "train.eval_batches=1000",
        "tracking.experiment=eval-tests",
    )
    out = run_training(cfg, progress=False, log=lambda *a: None)
    assert out.result.status == "finished"
    return cfg, out


def _mlflow_eval_keys(out) -> set[str]:
    from alcot.orchestrator.tracking.stores import open_client

    run = open_client(out.tracking_uri).get_run(out.run_id)
    return {k for k in run.data.metrics if k.startswith("eval/")}


def test_training_keeps_the_tokenizer_in_the_run_folder(trained):
    _, out = trained
    assert (out.out_dir / "tokenizer.json").is_file()
    assert (out.out_dir / "config.yaml").is_file()


def test_text_perplexity_equals_training_validation(trained, tmp_path, capsys):
    cfg, out = trained
    docs = _val_documents(cfg)
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    result = tmp_path / "res.json"
    assert main(["eval", str(out.out_dir), "--text", str(val), "--json", str(result)]) == 0
    res = json.loads(result.read_text())
    (entry,) = res["budgets"]
    m = entry["corpora"]["val"]
    assert m["ppl"] == pytest.approx(out.result.metrics["val/ppl"], rel=1e-5)
    assert m["tokens"] > 100
    assert 0 < m["bits_per_byte"] < 20
    # recorded: the trained budget's metrics under eval/, and the JSON as an artifact
    keys = _mlflow_eval_keys(out)
    assert "eval/val/ppl" in keys and "eval/flops_per_token" in keys
    assert list((out.out_dir / "eval").glob("*.json"))
    table = capsys.readouterr().out
    assert "ppl" in table and "FLOPs/token" in table


def test_a_run_is_named_by_folder_checkpoint_or_mlflow_id(trained):
    from alcot.orchestrator.evaluation.loading import resolve_target

    _, out = trained
    newest = sorted((out.out_dir / "checkpoints").glob("step_*"))[-1]
    for target in (out.out_dir, newest, out.run_id):
        run_dir, info = resolve_target(str(target))
        assert run_dir == out.out_dir.resolve() and info.path == newest.resolve()


def test_sliding_windows_score_every_token_once(trained, tmp_path):
    from alcot.orchestrator.evaluation.loading import load_run
    from alcot.orchestrator.evaluation.perplexity import sliding_nll, token_stream

    _, out = trained
    loaded = load_run(out.out_dir)
    ids, _ = token_stream(loaded, ["Mia went to the market with 3 red apples. " * 12])
    nll_disjoint, n1 = sliding_nll(loaded, ids)
    nll_overlap, n2 = sliding_nll(loaded, ids, stride=loaded.seq_len // 4)
    assert n1 == n2 == len(ids) - 1
    assert nll_overlap != pytest.approx(nll_disjoint, rel=1e-6)  # more context, other numbers


def test_a_continuation_longer_than_the_context_is_scored_in_windows(trained):
    from alcot.orchestrator.evaluation.loading import load_run
    from alcot.orchestrator.evaluation.perplexity import sliding_nll
    from alcot.orchestrator.evaluation.scoring import score_continuations

    _, out = trained
    loaded = load_run(out.out_dir)
    ids = loaded.encode("Zoe went to school with 4 white keys. There Zoe met Kai. " * 12)
    assert len(ids) > 2 * loaded.seq_len + 1
    ids = ids[: 1 + 2 * loaded.seq_len]  # whole windows: the same contexts as disjoint windows
    ((logp, _),) = score_continuations(loaded, [(ids[:1], ids[1:])])
    nll, count = sliding_nll(loaded, ids)
    assert count == len(ids) - 1
    assert -logp == pytest.approx(nll, rel=1e-5)


def test_two_budgets_give_different_depths_and_flops(trained, tmp_path):
    _, out = trained
    text = tmp_path / "story.txt"
    text.write_text("Leo went to the garden with 7 blue cups. There Leo met Ava. " * 6)
    result = tmp_path / "res.json"
    args = ["eval", str(out.out_dir), "--text", str(text), "--tau", "0.001,0.9", "--l-max", "1"]
    assert main([*args, "--l-max", "3", "--json", str(result)]) == 0
    res = json.loads(result.read_text())
    by = {(e["tau"], e["l_max"]): e for e in res["budgets"]}
    assert set(by) == {(0.001, 1), (0.9, 1), (0.001, 3), (0.9, 3)}
    depth = {b: e["corpora"]["story"]["mean_depth"] for b, e in by.items()}
    flops = {b: e["flops_per_token"] for b, e in by.items()}
    assert depth[(0.9, 3)] < depth[(0.001, 3)]  # a higher threshold prunes more
    assert depth[(0.001, 1)] <= 1.0 < depth[(0.001, 3)]  # l_max caps the depth
    assert flops[(0.9, 3)] < flops[(0.001, 3)] and flops[(0.001, 1)] < flops[(0.001, 3)]
    keys = _mlflow_eval_keys(out)
    assert "eval/budget/tau_0.001_lmax_1/story/ppl" in keys
    assert "eval/budget/tau_0.9_lmax_3/flops_per_token" in keys


def _lm_eval_cli(run_dir, tasks, limit, out_dir):
    from alcot.orchestrator.evaluation.lmeval_tasks import render_tasks

    include = render_tasks(FIXTURES, out_dir / "tasks")
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    cmd = [
        str(VENV_BIN / "lm_eval"),
        "--model",
        "alcot",
        "--model_args",
        f"run={run_dir}",
        "--tasks",
        ",".join(tasks),
        "--include_path",
        str(include),
        "--limit",
        str(limit),
        "--output_path",
        str(out_dir / "harness"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (found,) = list((out_dir / "harness").rglob("results*.json"))
    return json.loads(found.read_text())["results"]


def test_registered_model_matches_the_harness_cli(trained, tmp_path):
    _, out = trained
    result = tmp_path / "res.json"
    rc = main(
        [
            "eval",
            str(out.out_dir),
            "--tasks",
            "lambada,arc_easy",
            "--data-dir",
            str(FIXTURES),
            "--limit",
            "8",
            "--no-log",
            "--json",
            str(result),
        ]
    )
    assert rc == 0
    ours = json.loads(result.read_text())["budgets"][0]["tasks"]
    assert set(ours) == {"alcot_lambada_openai", "alcot_arc_easy"}
    assert "acc_stderr" in ours["alcot_arc_easy"] and "acc_norm" in ours["alcot_arc_easy"]
    harness = _lm_eval_cli(out.out_dir, ["alcot_lambada_openai", "alcot_arc_easy"], 8, tmp_path)
    for task in ours:
        for metric in ("acc", "perplexity", "acc_norm"):
            if metric in ours[task]:
                assert harness[task][f"{metric},none"] == pytest.approx(
                    ours[task][metric], rel=1e-6
                ), (task, metric)


def test_rolling_loglikelihood_task(trained, tmp_path):
    _, out = trained
    result = tmp_path / "res.json"
    args = ["eval", str(out.out_dir), "--tasks", "wikitext2", "--data-dir", str(FIXTURES)]
    assert main([*args, "--no-log", "--json", str(result)]) == 0
    m = json.loads(result.read_text())["budgets"][0]["tasks"]["alcot_wikitext2"]
    assert m["word_perplexity"] > 1 and m["bits_per_byte"] > 0


def test_generate_until_through_the_cached_decoder(trained):
    from lm_eval.api.instance import Instance

    from alcot.orchestrator.evaluation.lmeval_model import AlcotHarnessLM
    from alcot.orchestrator.evaluation.loading import load_run

    _, out = trained
    lm = AlcotHarnessLM(loaded=load_run(out.out_dir), batch_size=4)
    reqs = [
        Instance("generate_until", {}, (p, {"until": ["."], "max_gen_toks": 12}), i)
        for i, p in enumerate(["Mia went to", "Leo went to", "one plus two is"])
    ]
    texts = lm.generate_until(reqs)
    assert len(texts) == 3 and all("." not in t for t in texts)
    # the same as greedy decoding with the model's own decoder, cut at the stop string
    import torch

    from alcot.model.generate import generate

    for prompt, text in zip(["Mia went to", "one plus two is"], [texts[0], texts[2]], strict=True):
        ids = lm.loaded.encode(prompt)
        g = generate(lm.loaded.model, torch.tensor([ids]), 12)
        full = lm.loaded.decode(g.tokens[0, len(ids) :].tolist())
        assert text == full.split(".")[0].split("<|endoftext|>")[0]


@pytest.mark.parametrize(
    "case",
    ["unknown_task", "missing_data_dir", "missing_data_file", "non_utf8", "missing_text"],
)
def test_bad_input_exits_2_and_records_nothing(trained, tmp_path, capsys, case):
    _, out = trained
    before = _mlflow_eval_keys(out)
    evals_before = sorted((out.out_dir / "eval").glob("*.json"))
    args = ["eval", str(out.out_dir)]
    if case == "unknown_task":
        args += ["--tasks", "no_such_task_xyz", "--data-dir", str(FIXTURES)]
        needle = "no_such_task_xyz"
    elif case == "missing_data_dir":
        args += ["--tasks", "lambada", "--data-dir", str(tmp_path / "nowhere")]
        needle = "nowhere"
    elif case == "missing_data_file":
        (tmp_path / "data").mkdir()
        args += ["--tasks", "piqa", "--data-dir", str(tmp_path / "data")]
        needle = "valid_with_labels.jsonl"
    elif case == "non_utf8":
        bad = tmp_path / "latin.txt"
        bad.write_bytes("caf\xe9 au lait".encode("latin-1"))
        args += ["--text", str(bad)]
        needle = "latin.txt"
    else:
        args += ["--text", str(tmp_path / "absent.txt")]
        needle = "absent.txt"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert _mlflow_eval_keys(out) == before
    assert sorted((out.out_dir / "eval").glob("*.json")) == evals_before


def test_run_without_checkpoint_and_checkpoint_of_another_size(trained, tmp_path, capsys):
    import shutil

    import yaml

    _, out = trained
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(out.out_dir / "config.yaml", bare / "config.yaml")
    assert main(["eval", str(bare), "--text", str(FIXTURES / "README.md")]) == 2
    assert "no (valid) checkpoint" in capsys.readouterr().err

    other = yaml.safe_load((out.out_dir / "config.yaml").read_text())
    other["model"]["hidden_size"] = 128
    cfg = tmp_path / "other.yaml"
    cfg.write_text(yaml.safe_dump(other))
    ckpt = sorted((out.out_dir / "checkpoints").glob("step_*"))[-1]
    rc = main(["eval", str(ckpt), "--config", str(cfg), "--text", str(FIXTURES / "README.md")])
    assert rc == 2
    err = capsys.readouterr().err
    assert str(ckpt) in err and "does not fit" in err


def test_generate_shows_depth_in_html(trained, tmp_path, capsys):
    _, out = trained
    page = tmp_path / "depth.html"
    data = tmp_path / "depth.json"
    args = ["generate", str(out.out_dir), "--prompt", "Ava went to the market with"]
    rc = main([*args, "--max-new-tokens", "8", "--html", str(page), "--json", str(data)])
    assert rc == 0
    (view,) = json.loads(data.read_text())
    toks = view["tokens"]
    assert sum(t["generated"] for t in toks) == 8
    assert all(0 <= t["depth"] <= 3 and 0 < t["p_step0"] <= 1 for t in toks[1:])
    html = page.read_text()
    assert html.count("data-depth=") == len(toks) - 1
    assert "step-0 p = " in html
    printed = capsys.readouterr().out
    assert "[" in printed  # depths inline when not a terminal


def test_prompt_longer_than_the_context_exits_2(trained, capsys):
    _, out = trained
    long = "Mia went to the market with 3 red apples. " * 40
    assert main(["generate", str(out.out_dir), "--prompt", long]) == 2
    assert "longer than the model's context" in capsys.readouterr().err


def test_harness_registry_knows_alcot_beside_its_own_models():
    """In a fresh interpreter (the install's .pth hook, nothing of alcot imported): lm-eval
    finds ``alcot`` and still its built-in models."""
    code = (
        "import lm_eval.api.registry as r; "
        "print(r.get_model('alcot').__name__, r.get_model('dummy').__name__)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["AlcotHarnessLM", "DummyLM"]
