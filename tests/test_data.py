import json

import numpy as np
import pytest
import torch

from alcot.data import DataConfig, PackedLoader, prepare
from alcot.data.corpus import builtin_documents
from alcot.data.sources import iter_documents
from alcot.model import ConfigError


def test_builtin_corpus_is_deterministic():
    assert builtin_documents(50) == builtin_documents(50)
    assert len(builtin_documents(50)) == 50


def test_token_files_are_cached_and_reused(tmp_path):
    cfg = DataConfig(builtin_documents=300, vocab_size=400)
    logs = []
    first = prepare(cfg, tmp_path, log=logs.append)
    assert not first.cache_hit and any("tokenising" in line for line in logs)
    mtime = first.train_path.stat().st_mtime_ns
    logs.clear()
    second = prepare(cfg, tmp_path, log=logs.append)
    assert second.cache_hit and second.key == first.key and not logs
    assert second.train_path.stat().st_mtime_ns == mtime
    # a different setting is a different entry
    third = prepare(DataConfig(builtin_documents=300, vocab_size=420), tmp_path)
    assert third.key != first.key and not third.cache_hit
    assert first.dtype == "uint16"
    manifest = json.loads((first.root / "manifest.json").read_text())
    assert manifest["docs_train"] + manifest["docs_val"] == 300
    assert manifest["docs_val"] >= 1
    tokens = np.fromfile(first.train_path, dtype=first.dtype)
    assert len(tokens) == first.n_train and tokens.max() < first.vocab_size


def test_validation_is_held_out_by_document(tmp_path):
    docs = [f"document number {i} says {'abc' * (i % 7)} end" for i in range(200)]
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(json.dumps({"body": d}) for d in docs))
    cfg = DataConfig(source="jsonl", path=str(src), text_field="body", vocab_size=300)
    data = prepare(cfg, tmp_path / "cache")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(data.tokenizer_path))
    split = {}
    for name, path in (("train", data.train_path), ("val", data.val_path)):
        ids = np.fromfile(path, dtype=data.dtype).tolist()
        text = tok.decode(ids, skip_special_tokens=False)
        split[name] = {d for d in text.split("<|endoftext|>") if d}
    assert split["train"] and split["val"]
    assert not (split["train"] & split["val"])
    assert split["train"] | split["val"] == set(docs)


def test_text_folder_and_hf_sources(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.txt").write_text(f"Paragraph one of file {i}.\n \nParagraph two.")
    docs = list(iter_documents(DataConfig(source="text", path=str(folder))))
    assert len(docs) == 5
    docs = list(iter_documents(DataConfig(source="text", path=str(folder), split_paragraphs=True)))
    assert len(docs) == 10

    import datasets

    ds = datasets.Dataset.from_dict({"text": [f"hf document {i}" for i in range(12)]})
    ds.save_to_disk(str(tmp_path / "hf"))
    docs = list(iter_documents(DataConfig(source="hf", path=str(tmp_path / "hf"))))
    assert docs == [f"hf document {i}" for i in range(12)]


@pytest.mark.parametrize(
    "cfg, field",
    [
        (dict(source="jsonl"), "data.path"),
        (dict(source="text", path="/no/such/file.txt"), "data.path"),
        (dict(source="csv", path="x"), "data.source"),
        (dict(val_fraction=1.5), "data.val_fraction"),
    ],
)
def test_bad_data_settings_name_the_field(cfg, field):
    with pytest.raises(ConfigError) as err:
        list(iter_documents(DataConfig(**cfg)))
    assert err.value.field == field


def test_jsonl_without_the_text_field(tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_text('{"body": "x"}\n')
    with pytest.raises(ConfigError) as err:
        list(iter_documents(DataConfig(source="jsonl", path=str(src))))
    assert err.value.field == "data.text_field" and "d.jsonl:1" in str(err.value)


def test_loader_order_is_deterministic_and_resumable(tmp_path):
    data = prepare(DataConfig(builtin_documents=200, vocab_size=300), tmp_path)
    a = PackedLoader(data.train_path, data.dtype, 16, 4, seed=3)
    batches = [a.next_batch() for _ in range(5)]
    b = PackedLoader(data.train_path, data.dtype, 16, 4, seed=3)
    for _ in range(2):
        b.next_batch()
    state = b.state_dict()
    c = PackedLoader(data.train_path, data.dtype, 16, 4, seed=3)
    c.load_state_dict(state)
    for x, y in batches[2:]:
        cx, cy = c.next_batch()
        assert torch.equal(x, cx) and torch.equal(y, cy)
    x, y = batches[0]
    assert x.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    other = PackedLoader(data.train_path, data.dtype, 16, 4, seed=4).next_batch()
    assert not torch.equal(other[0], batches[0][0])
