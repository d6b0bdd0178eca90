"""Streamed preparation: the same tokens as reading everything into memory, bounded memory,
parallel tokenizer processes, a resumable build, tokenizers users have, and bad input."""

import importlib
import json
import random
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from alcot.data import DataConfig, prepare
from alcot.data.loader import TokenStream
from alcot.model import ConfigError


def write_corpus(folder, n_files=3, paragraphs=120, seed=0):
    """Text files of blank-line-separated paragraphs, with the awkward cases: whitespace-only
    separator lines, runs of blank lines, CRLF endings, non-ASCII text."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "délta", "ε", "zeta", "eta", "theta", "42", "7+5=12"]
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(n_files):
        parts = []
        for _ in range(paragraphs):
            lines = [" ".join(rng.choices(words, k=rng.randint(3, 30))) for _ in range(3)]
            parts.append("\n".join(lines[: rng.randint(1, 3)]))
            parts.append(rng.choice(["\n\n", "\n \n", "\n\t\n\n", "\r\n\r\n", "\n\n\n"]))
        (folder / f"{f}.txt").write_text("".join(parts), encoding="utf-8")
    return folder


def reference_stream(cfg):
    """The token stream as the earlier in-memory preparation made it: every document in a list,
    split by a regex, the BPE trained on all training documents, ids + end-of-text."""
    from alcot.data.tokenizer import EOS, train_bpe

    docs = []
    for f in sorted(cfg_path(cfg).rglob("*.txt")):
        text = f.read_bytes().decode("utf-8")
        docs += [p.strip() for p in re.split(r"\n[ \t]*\n", text) if p.strip()]
    rng = random.Random(cfg.split_seed)
    is_val = [rng.random() < cfg.val_fraction for _ in docs]
    train = [d for d, v in zip(docs, is_val, strict=True) if not v]
    val = [d for d, v in zip(docs, is_val, strict=True) if v]
    tok = train_bpe(train, cfg.vocab_size)
    eos = tok.token_to_id(EOS)
    out = {}
    for name, split in (("train", train), ("val", val)):
        ids = []
        for e in tok.encode_batch(split):
            ids += e.ids + [eos]
        out[name] = np.asarray(ids, dtype=np.int64)
    return out, len(train), len(val)


def cfg_path(cfg):
    from pathlib import Path

    return Path(cfg.path)


@pytest.mark.parametrize("workers", [1, 2])
def test_stream_equals_the_in_memory_preparation(tmp_path, workers):
    folder = write_corpus(tmp_path / "corpus")
    cfg = DataConfig(
        source="text",
        path=str(folder),
        split_paragraphs=True,
        vocab_size=300,
        workers=workers,
        shard_tokens=3000,
        val_fraction=0.1,
    )
    data = prepare(cfg, tmp_path / "cache")
    want, n_train, n_val = reference_stream(cfg)
    assert data.docs == {"train": n_train, "val": n_val}
    assert len(data.train_prefixes) > 2  # several shards, read back as one stream
    for name, bins in (("train", data.train_bins), ("val", data.val_bins)):
        ts = TokenStream(bins, data.dtype)
        assert np.array_equal(ts.window(0, len(ts)), want[name]), name


def test_interrupted_preparation_continues_where_it_stopped(tmp_path, monkeypatch):
    prep = importlib.import_module("alcot.data.preparation")

    folder = write_corpus(tmp_path / "corpus")
    cfg = DataConfig(
        source="text",
        path=str(folder),
        split_paragraphs=True,
        vocab_size=300,
        workers=1,
        shard_tokens=3000,
    )
    clean = prepare(cfg, tmp_path / "clean")

    real_close, closes = prep._Shards.close, []

    def close_then_crash(self):
        real_close(self)
        closes.append(1)
        if len(closes) == 3:
            raise KeyboardInterrupt  # as if the machine went away mid-way

    monkeypatch.setattr(prep._Shards, "close", close_then_crash)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, tmp_path / "cache")
    monkeypatch.setattr(prep._Shards, "close", real_close)
    cache = tmp_path / "cache"
    assert not any(p.is_dir() and not p.name.startswith(".") for p in cache.iterdir())
    assert (
        json.loads((cache / f".{clean.key}.partial" / "progress.json").read_text())["docs_done"] > 0
    )
    logs = []
    resumed = prepare(cfg, cache, log=logs.append)
    assert any("continuing" in line for line in logs), logs
    assert not (cache / f".{clean.key}.partial").exists()
    for a, b in ((clean.train_bins, resumed.train_bins), (clean.val_bins, resumed.val_bins)):
        assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


def test_cache_key_follows_the_files_not_their_text(tmp_path):
    folder = write_corpus(tmp_path / "corpus", n_files=2)
    cfg = DataConfig(source="text", path=str(folder), split_paragraphs=True, vocab_size=300)
    first = prepare(cfg, tmp_path / "cache")
    assert prepare(cfg, tmp_path / "cache").cache_hit
    f = folder / "1.txt"
    f.write_text(f.read_text() + "\n\nOne more paragraph.\n")
    changed = prepare(cfg, tmp_path / "cache")
    assert changed.key != first.key and not changed.cache_hit
    manifest = tmp_path / "MANIFEST"
    manifest.write_text("corpus v1\n")
    pinned = DataConfig(
        source="text",
        path=str(folder),
        split_paragraphs=True,
        vocab_size=300,
        manifest=str(manifest),
    )
    key = prepare(pinned, tmp_path / "cache").key
    f.write_text(f.read_text() + "\n\nAnd another.\n")  # the manifest stands for the files
    assert prepare(pinned, tmp_path / "cache").key == key


def test_bpe_trains_on_a_bounded_sample(tmp_path):
    folder = write_corpus(tmp_path / "corpus", n_files=4, paragraphs=300)
    total = sum(p.stat().st_size for p in folder.iterdir())
    logs = []
    cfg = DataConfig(
        source="text",
        path=str(folder),
        split_paragraphs=True,
        vocab_size=300,
        tokenizer_sample=total // 10,
    )
    prep = importlib.import_module("alcot.data.preparation")

    sample = list(prep.bpe_sample(cfg, {}))
    assert sum(len(d) for d in sample) <= total // 10 + max(len(d) for d in sample)
    assert len(sample) > 10
    files = {i for i, d in enumerate(prep.iter_documents(cfg)) if d in set(sample)}
    assert max(files) > len(list(prep.iter_documents(cfg))) // 2  # spread, not just the start
    data = prepare(cfg, tmp_path / "cache", log=logs.append)
    assert data.n_train > 0 and any(f"{total // 10:,}" in line for line in logs)


MEASURE = textwrap.dedent(
    """
    import json, resource, sys
    from pathlib import Path
    from alcot.data import DataConfig, prepare
    folder, cache = sys.argv[1], sys.argv[2]
    cfg = DataConfig(source="text", path=folder, split_paragraphs=True, vocab_size=300,
                     workers=1, tokenizer_sample=2_000_000, shard_tokens=2_000_000)
    data = prepare(cfg, cache, log=lambda *a: None)
    print(json.dumps({"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "tokens": data.n_train + data.n_val}))
    """
)


def test_memory_stays_bounded_when_the_corpus_doubles(tmp_path):
    """Peak RSS of preparing a corpus, and one twice its size: within 10 % (an in-memory
    preparation would grow by ~30 bytes a token)."""

    def corpus(name, copies):
        folder = tmp_path / name
        folder.mkdir()
        block = "".join(
            f"Paragraph {i} tells of {i % 97} apples and {i * 7 % 13} pears in the garden.\n\n"
            for i in range(40_000)
        )  # about 3 MB
        for c in range(copies):
            (folder / f"{c}.txt").write_text(block.replace("garden", f"garden {c}"))
        return folder

    peaks, tokens = [], []
    for name, copies in (("small", 2), ("large", 4)):
        out = subprocess.run(
            [sys.executable, "-c", MEASURE, str(corpus(name, copies)), str(tmp_path / name / "c")],
            capture_output=True,
            text=True,
            check=True,
        )
        row = json.loads(out.stdout.strip().splitlines()[-1])
        peaks.append(row["rss"])
        tokens.append(row["tokens"])
    assert tokens[1] > 1.9 * tokens[0] and tokens[0] > 1_000_000
    print("peak RSS (KiB) of the corpus and of twice it:", peaks, "tokens:", tokens)
    assert peaks[1] <= 1.10 * peaks[0], peaks


# ------------------------------------------------------------------------------ tokenizers
def neox_like(tmp_path, extra=0):
    """A GPT-NeoX-style tokenizer folder made here (no download): a byte-level BPE with
    ``<|endoftext|>``, saved by transformers' save_pretrained."""
    from transformers import PreTrainedTokenizerFast

    from alcot.data.corpus import builtin_documents
    from alcot.data.tokenizer import train_bpe

    tok = train_bpe(builtin_documents(200), 600)
    if extra:
        tok.add_tokens([f"<extra_{i}>" for i in range(extra)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    folder = tmp_path / f"neox-like-{extra}"
    fast.save_pretrained(str(folder))
    return folder, tok.get_vocab_size()


def test_a_local_tokenizer_folder_and_the_vocabulary_check(tmp_path):
    folder, size = neox_like(tmp_path)
    cfg = DataConfig(builtin_documents=200, tokenizer=str(folder), vocab_size=640)
    data = prepare(cfg, tmp_path / "cache")
    assert data.tokenizer_vocab == size and data.vocab_size == 640
    own = prepare(DataConfig(builtin_documents=200, tokenizer=str(folder)), tmp_path / "cache")
    assert own.vocab_size == size and own.key == data.key  # same tokens, same entry
    # a tokenizer.json by path gives the same tokens
    by_file = prepare(
        DataConfig(builtin_documents=200, tokenizer=str(folder / "tokenizer.json")),
        tmp_path / "cache",
    )
    assert by_file.train_path.read_bytes() == own.train_path.read_bytes()
    with pytest.raises(ConfigError) as err:
        prepare(
            DataConfig(builtin_documents=200, tokenizer=str(folder), vocab_size=512),
            tmp_path / "cache",
        )
    assert err.value.field == "data.vocab_size" and str(folder) in str(err.value)
    with pytest.raises(ConfigError) as err:
        prepare(
            DataConfig(builtin_documents=200, tokenizer=str(tmp_path / "nothing")),
            tmp_path / "cache",
        )
    assert err.value.field == "data.tokenizer"


def test_the_model_vocabulary_is_padded_from_the_tokenizer(tmp_path, alcot_home):
    """GPT-NeoX's case in small: 601 + 2 tokens padded to a multiple of 64 (as 50,277 is to
    50,304); data.vocab_size sets it exactly; the run identity of older configs is kept."""
    from conftest import small_run

    from alcot.orchestrator.config import config_hash, identity_dict
    from alcot.orchestrator.training_run import resolve

    folder, size = neox_like(tmp_path, extra=2)
    cfg = small_run(tmp_path / "r", f"data.tokenizer={folder}", "data.vocab_size=null")
    data = prepare(cfg.data, tmp_path / "cache")
    assert resolve(cfg, data.vocab_size).model.vocab_size == -(-size // 64) * 64
    assert identity_dict(cfg)["data"]["vocab_size"] == 2048  # as recorded before the change
    assert config_hash(cfg) == config_hash(
        small_run(
            tmp_path / "r", f"data.tokenizer={folder}", "data.vocab_size=null", "data.workers=1"
        )
    )


def test_bad_input_exits_2_and_leaves_nothing_half_written(tmp_path, capsys, monkeypatch):
    from alcot.orchestrator.cli import main

    folder = write_corpus(tmp_path / "corpus", n_files=2)
    with open(folder / "1.txt", "ab") as f:  # undecodable bytes past the first block
        f.write(b"\n\nfine text\n\nbad \xff\xfe bytes\n")
    config = tmp_path / "run.yaml"
    config.write_text(
        f"data: {{source: text, path: {folder}, split_paragraphs: true, vocab_size: 300, "
        "seq_len: 16}\n"
    )
    cache = tmp_path / "home" / "cache"
    monkeypatch.setenv("ALCOT_HOME", str(tmp_path / "home"))  # restored after the test
    assert main(["data", "prepare", str(config)]) == 2
    err = capsys.readouterr().err
    assert "1.txt" in err and "data.path" in err and "not valid utf-8" in err
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []
    (folder / "1.txt").unlink()
    assert main(["data", "prepare", str(config), "--set", "data.workers=2"]) == 0
    out = capsys.readouterr().out
    assert "train_00000" in out and "prepared" in out
