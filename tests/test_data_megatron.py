"""Megatron-Core's indexed format both ways: token files written with its IndexedDatasetBuilder
train through its GPTDataset / BlendedMegatronDatasetBuilder, resuming exactly."""

import shutil

import numpy as np
import pytest
import torch
from conftest import small_run

from alcot.data import DataConfig, prepare
from alcot.model import ConfigError


def write_indexed(prefix, docs, dtype=np.uint16):
    """``docs`` (lists of token ids) as a .bin/.idx pair, with Megatron-Core's own writer."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for doc in docs:
        builder.add_document(np.asarray(doc, dtype=dtype), [len(doc)])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def random_docs(n, vocab, seed):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(1, vocab, int(rng.integers(5, 80)))) + [0] for _ in range(n)]


def test_writer_output_trains_and_resumes_exactly(tmp_path, alcot_home):
    """Tokens of the built-in corpus written with IndexedDatasetBuilder, trained as
    ``data.source: megatron``: six steps straight through equal three + three resumed from the
    step-3 checkpoint."""
    from alcot.data.corpus import builtin_documents
    from alcot.data.tokenizer import load_tokenizer
    from alcot.model.trainer import Callback, train

    base = small_run(tmp_path / "x")
    tok_data = prepare(base.data, alcot_home / "cache", log=lambda *_: None)
    tok = load_tokenizer(tok_data.tokenizer_path)
    docs = [e.ids + [tok_data.eos_id] for e in tok.encode_batch(builtin_documents(600))]
    prefix = write_indexed(tmp_path / "corpus", docs)

    def run(out_dir, steps):
        cfg = small_run(
            out_dir,
            "data.source=megatron",
            f"data.path={prefix}",
            f"data.tokenizer={tok_data.tokenizer_path}",
            "data.vocab_size=512",
            f"train.steps={steps}",
            "train.checkpoint_every=3",
            "train.eval_every=3",
        )
        data = prepare(cfg.data, alcot_home / "cache", log=lambda *_: None)
        assert data.docs["train"] + data.docs["val"] == 600 and data.vocab_size == 512
        seen = {}

        class Rec(Callback):
            def on_step_end(self, step, metrics):
                seen[step] = metrics

        res = train(
            cfg.model, data, cfg.train, cfg.seed, out_dir, cfg.data.seq_len, [Rec()], progress=False
        )
        assert res.status == "finished", res.message
        return seen

    full = run(tmp_path / "full", 6)
    assert full[6]["train/loss"] < full[1]["train/loss"]
    assert "val/loss" in full[3] and "val/loss" in full[6]
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        tmp_path / "full" / "checkpoints" / "step_00000003", part / "checkpoints" / "step_00000003"
    )
    resumed = run(part, 6)
    assert set(resumed) == {4, 5, 6}
    for step in (4, 5, 6):
        for key in ("train/loss", "train/ce", "train/grad_norm", "tokens_seen"):
            assert resumed[step][key] == full[step][key], (step, key)
    assert resumed[6]["val/loss"] == full[6]["val/loss"]


def test_loader_samples_blend_and_data_parallel_slices(tmp_path):
    a = write_indexed(tmp_path / "a", random_docs(200, 300, 0))
    b = write_indexed(tmp_path / "b", random_docs(100, 300, 1))
    cfg = DataConfig(
        source="megatron", path=[a, b], weights=[0.75, 0.25], vocab_size=300, seq_len=16
    )
    data = prepare(cfg, tmp_path / "cache")
    assert data.n_train > data.n_val > 0
    whole = data.train_loader(16, 8, seed=5, samples=80)
    ranks = [data.train_loader(16, 8, seed=5, rank=r, world=2, samples=80) for r in (0, 1)]
    for _ in range(3):
        x, y = whole.next_batch()
        assert x.shape == (8, 16) and torch.equal(x[:, 1:], y[:, :-1])
        parts = [r.next_batch() for r in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
    # resume from the state mid-way: the same batches as the uninterrupted loader
    state = whole.state_dict()
    later = [whole.next_batch()[0] for _ in range(2)]
    again = data.train_loader(16, 8, seed=5, samples=80)
    again.load_state_dict(state)
    assert all(torch.equal(again.next_batch()[0], x) for x in later)
    # another seed, another order; the blend draws from both datasets
    other = data.train_loader(16, 8, seed=6, samples=80).next_batch()[0]
    assert not torch.equal(other, data.train_loader(16, 8, seed=5, samples=80).next_batch()[0])
    from megatron.core.datasets.blended_dataset import BlendedDataset

    assert isinstance(whole.dataset, BlendedDataset)
    picked = np.bincount(whole.dataset.dataset_index[:80], minlength=2)
    assert picked[0] > picked[1] > 0


def test_prepare_writes_megatron_files_that_megatron_reads(tmp_path):
    """`alcot data prepare`'s shards are IndexedDataset prefixes: their documents are the
    prepared token stream, document by document."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    cfg = DataConfig(builtin_documents=300, vocab_size=400, shard_tokens=5000)
    data = prepare(cfg, tmp_path)
    assert len(data.train_prefixes) > 2  # several shards
    stream, n_docs = [], 0
    for p in data.train_prefixes:
        ds = IndexedDataset(str(p))
        n_docs += len(ds)
        for i in range(len(ds)):
            doc = np.array(ds[i])  # a copy: the mapping closes with ds
            assert doc[-1] == data.eos_id and data.eos_id not in doc[:-1]
            stream.append(doc)
    assert n_docs == data.docs["train"]
    tokens = np.concatenate(stream)
    assert len(tokens) == data.n_train
    from alcot.data.loader import TokenStream

    ts = TokenStream(data.train_bins, data.dtype)
    assert np.array_equal(ts.window(0, len(ts)), tokens.astype(np.int64))
    # and they train as megatron data
    again = prepare(
        DataConfig(
            source="megatron",
            path=[str(p) for p in data.train_prefixes],
            tokenizer=str(data.tokenizer_path),
            seq_len=16,
        ),
        tmp_path,
    )
    assert again.vocab_size == 400 and again.n_train + again.n_val == data.n_train


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing"])
def test_idx_that_does_not_match_its_bin(tmp_path, damage):
    prefix = write_indexed(tmp_path / "c", random_docs(50, 300, 2))
    if damage == "truncate":
        data = (tmp_path / "c.bin").read_bytes()
        (tmp_path / "c.bin").write_bytes(data[:-10])
    elif damage == "garbage":
        (tmp_path / "c.idx").write_bytes(b"not an index at all" * 3)
    else:
        (tmp_path / "c.idx").unlink()
    cfg = DataConfig(source="megatron", path=prefix, vocab_size=300)
    with pytest.raises(ConfigError) as err:
        prepare(cfg, tmp_path / "cache")
    assert err.value.field == "data.path" and "c." in str(err.value)


def test_token_ids_beyond_the_vocabulary(tmp_path):
    prefix = write_indexed(tmp_path / "d", random_docs(50, 1000, 3))
    with pytest.raises(ConfigError) as err:
        prepare(DataConfig(source="megatron", path=prefix, vocab_size=300), tmp_path / "cache")
    assert err.value.field == "data.vocab_size" and "d.bin" in str(err.value)
    with pytest.raises(ConfigError) as err:
        DataConfig(source="megatron", path=prefix)
    assert err.value.field == "data.vocab_size"
    with pytest.raises(ConfigError) as err:
        DataConfig(source="megatron", path=[prefix, prefix], weights=[1.0], vocab_size=1000)
    assert err.value.field == "data.weights"


def test_alcot_train_from_megatron_files_and_a_bad_index(tmp_path, capsys):
    """`alcot train` with data.source megatron: a run and its MLflow record; an .idx that does
    not match its .bin is exit 2 naming the file, before any MLflow run exists."""
    from conftest import SMALL_RUN, home_at
    from mlflow.tracking import MlflowClient

    from alcot.orchestrator.cli import main

    prefix = write_indexed(tmp_path / "m", random_docs(300, 512, 4))
    sets = [a for s in SMALL_RUN for a in ("--set", s)]
    sets += ["--set", "data.source=megatron", "--set", f"data.path={prefix}"]
    sets += ["--set", "train.steps=4", "--set", "train.eval_every=4"]
    with home_at(tmp_path / "home") as home:
        uri = f"sqlite:///{home / 'mlflow.db'}"
        code = main(
            [
                "train",
                "configs/train_adaptive.yaml",
                *sets,
                "--set",
                f"out_dir={tmp_path / 'run'}",
                "--no-progress",
            ]
        )
        assert code == 0, capsys.readouterr().err
        runs = MlflowClient(uri).search_runs(
            [MlflowClient(uri).get_experiment_by_name("tests").experiment_id]
        )
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        assert runs[0].data.params["model.vocab_size"] == "512"
        with open(f"{prefix}.bin", "r+b") as f:  # the .bin loses its last token
            f.truncate((tmp_path / "m.bin").stat().st_size - 2)
        code = main(
            [
                "train",
                "configs/train_adaptive.yaml",
                *sets,
                "--set",
                f"out_dir={tmp_path / 'run2'}",
                "--set",
                "tracking.experiment=bad",
            ]
        )
        err = capsys.readouterr().err
        assert code == 2 and "m.idx does not match its .bin" in err and "data.path" in err, err
        assert MlflowClient(uri).get_experiment_by_name("bad") is None


@pytest.mark.slow
def test_two_data_parallel_ranks_match_one_process(alcot_home, tmp_path):
    """Megatron data under torchrun (gloo, CPU): each rank takes its half of every global batch
    of Megatron-Core's samples, so two ranks train like one process."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from conftest import SMALL_RUN

    root, bin_dir = Path(__file__).resolve().parents[1], Path(sys.executable).parent
    prefix = write_indexed(tmp_path / "m", random_docs(300, 512, 5))
    sets = [a for s in SMALL_RUN for a in ("--set", s)]
    sets += ["--set", "data.source=megatron", "--set", f"data.path={prefix}"]
    sets += ["--set", "train.steps=6", "--set", "train.precision=fp32", "--no-progress"]
    cmd = ["train", str(root / "configs/train_adaptive.yaml"), *sets]
    from alcot.orchestrator.cli import main

    assert main([*cmd, "--set", f"out_dir={tmp_path / 'one'}"]) == 0  # one process: this one
    two = subprocess.run(
        [str(bin_dir / "torchrun"), "--standalone", "--nproc_per_node=2", "-m",
         "alcot.orchestrator.cli", *cmd, "--set", f"out_dir={tmp_path / 'two'}"],
        cwd=root, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    losses = {}
    for name in ("one", "two"):
        rows = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        losses[name] = {r["step"]: r["metrics"]["train/loss"] for r in map(json.loads, rows)}
    assert set(losses["one"]) == set(losses["two"]) == set(range(1, 7))
    for step, loss in losses["one"].items():
        assert abs(loss - losses["two"][step]) < 1e-4, (step, loss, losses["two"][step])
