"""Tokenise a source once into memory-mapped token files, cached by content and settings.

Layout of one cache entry, ``<cache>/<key>/``: ``tokenizer.json``, ``train.bin``, ``val.bin``
(raw little-endian uint16 when the vocabulary fits, else uint32; documents joined by the
end-of-text token) and ``manifest.json`` (sizes, checksums, settings) written last. The key is
a hash of the documents' text, the tokenizer settings and the split settings, so a second run,
or another trial of a sweep, reuses the entry; an entry is built in a temporary folder and
renamed into place, so a crash never leaves a half-written one behind.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alcot.model.checkpoints import file_sha256
from alcot.model.typed import ConfigError

from .config import DataConfig
from .sources import iter_documents
from .tokenizer import EOS, load_tokenizer, train_bpe

FORMAT = 1


@dataclass
class PreparedData:
    root: Path
    train_path: Path
    val_path: Path
    dtype: str
    n_train: int
    n_val: int
    vocab_size: int
    eos_id: int
    tokenizer_path: Path
    key: str
    cache_hit: bool


def cache_key(cfg: DataConfig, docs: list[str]) -> str:
    content = hashlib.sha256()
    for d in docs:
        b = d.encode("utf-8")
        content.update(len(b).to_bytes(8, "little"))
        content.update(b)
    if cfg.tokenizer:
        tok = Path(cfg.tokenizer).expanduser()
        if not tok.is_file():
            raise ConfigError("data.tokenizer", f"{tok} is not a file")
        tokenizer = {"file": file_sha256(tok)}
    else:
        tokenizer = {"bpe": "byte-level", "vocab_size": cfg.vocab_size}
    settings = {
        "format": FORMAT,
        "content": content.hexdigest(),
        "tokenizer": tokenizer,
        "val_fraction": cfg.val_fraction,
        "split_seed": cfg.split_seed,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]


def _load(entry: Path, key: str) -> PreparedData | None:
    try:
        m = json.loads((entry / "manifest.json").read_text())
        for split in ("train", "val"):
            size = (entry / f"{split}.bin").stat().st_size
            if size != m[f"n_{split}"] * np.dtype(m["dtype"]).itemsize:
                return None
    except (OSError, ValueError, KeyError):
        return None
    return PreparedData(
        root=entry,
        train_path=entry / "train.bin",
        val_path=entry / "val.bin",
        dtype=m["dtype"],
        n_train=m["n_train"],
        n_val=m["n_val"],
        vocab_size=m["vocab_size"],
        eos_id=m["eos_id"],
        tokenizer_path=entry / "tokenizer.json",
        key=key,
        cache_hit=True,
    )


def prepare(cfg: DataConfig, cache_root: str | Path, log=print) -> PreparedData:
    """Return the cached token files for ``cfg``, building them on first use."""
    docs = list(iter_documents(cfg))
    if len(docs) < 2:
        raise ConfigError("data.path", _too_few_documents(cfg, len(docs)))
    key = cache_key(cfg, docs)
    root = Path(cache_root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    entry = root / key
    hit = _load(entry, key)
    if hit is not None:
        return hit
    with open(root / f".{key}.lock", "w") as lock:  # concurrent trials build an entry once
        fcntl.flock(lock, fcntl.LOCK_EX)
        hit = _load(entry, key)
        if hit is not None:
            return hit
        log(f"tokenising {len(docs)} documents into {entry}")
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
        try:
            _build(cfg, docs, tmp)
            if entry.exists():  # a stale, incomplete entry
                shutil.rmtree(entry)
            os.replace(tmp, entry)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    built = _load(entry, key)
    if built is None:
        raise RuntimeError(f"token cache entry {entry} is unreadable right after building it")
    built.cache_hit = False
    return built


def _source_name(cfg: DataConfig) -> str:
    return "the built-in corpus" if cfg.source == "builtin" else str(cfg.path)


def _too_few_documents(cfg: DataConfig, n: int) -> str:
    msg = (
        f"{_source_name(cfg)} gives {n} document{'s' * (n != 1)}; training needs at least 2 "
        "(one is held out for validation)"
    )
    if cfg.source == "text" and not cfg.split_paragraphs:
        msg += (
            ". A text file is one document unless data.split_paragraphs: true splits it at "
            "blank lines"
        )
    return msg


def check_enough(cfg: DataConfig, data: PreparedData) -> None:
    """Both splits hold at least one sequence of ``seq_len + 1`` tokens (what training and
    evaluation read), or a ConfigError that names the input (not a cache file) and what to
    change. The trainer checks this before any MLflow run exists."""
    need = cfg.seq_len + 1
    if data.n_train < need or data.n_val < need:
        raise ConfigError(
            "data.path",
            f"{_source_name(cfg)} gives {data.n_train} training and {data.n_val} validation "
            f"tokens; each needs at least data.seq_len + 1 = {need}: use more text, a smaller "
            "data.seq_len, or a larger data.val_fraction",
        )


def _build(cfg: DataConfig, docs: list[str], out: Path) -> None:
    rng = random.Random(cfg.split_seed)
    is_val = [rng.random() < cfg.val_fraction for _ in docs]
    if all(is_val) or not any(is_val):  # always keep at least one document on each side
        is_val[0], is_val[-1] = True, False
    train_docs = [d for d, v in zip(docs, is_val, strict=True) if not v]
    val_docs = [d for d, v in zip(docs, is_val, strict=True) if v]
    if cfg.tokenizer:
        tok = load_tokenizer(Path(cfg.tokenizer).expanduser())
    else:
        tok = train_bpe(train_docs, cfg.vocab_size)
    tok.save(str(out / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    eos = tok.token_to_id(EOS)
    if eos is None:
        raise ConfigError("data.tokenizer", f"the tokenizer has no {EOS!r} token")
    dtype = np.uint16 if vocab <= np.iinfo(np.uint16).max + 1 else np.uint32
    counts = {}
    for split, split_docs in (("train", train_docs), ("val", val_docs)):
        ids = []
        for enc in tok.encode_batch(split_docs):
            ids.extend(enc.ids)
            ids.append(eos)
        arr = np.asarray(ids, dtype=dtype)
        arr.tofile(out / f"{split}.bin")
        counts[split] = (len(arr), len(split_docs), file_sha256(out / f"{split}.bin"))
    manifest = {
        "format": FORMAT,
        "dtype": np.dtype(dtype).name,
        "vocab_size": vocab,
        "eos_id": eos,
        "n_train": counts["train"][0],
        "n_val": counts["val"][0],
        "docs_train": counts["train"][1],
        "docs_val": counts["val"][1],
        "sha256_train": counts["train"][2],
        "sha256_val": counts["val"][2],
        "source": cfg.source,
        "tokenizer": cfg.tokenizer or f"byte-level BPE, {cfg.vocab_size}",
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
