"""Tokenise a source once, as a stream, into Megatron-Core ``IndexedDataset`` shards, cached by
the input's identity and the settings.

Layout of one cache entry, ``<cache>/<key>/``: ``tokenizer.json``; ``train_00000.bin/.idx``,
``val_00000.bin/.idx``, ... (Megatron-Core's format, written with its ``IndexedDatasetBuilder``:
each document's token ids followed by the end-of-text token, one sequence per document;
uint16 when the vocabulary fits, else int32) and ``manifest.json`` (shards, counts, settings),
written last. The training stream is the shards' tokens back to back, documents in source
order, exactly as one ``train.bin`` would hold them.

Memory stays bounded whatever the corpus size: documents are read as a stream
(``sources.py``), tokenised by ``data.workers`` processes on bounded chunks (at most two
chunks per process in flight) and written straight to the current shard. The BPE, when one is
trained, sees a deterministic sample of at most ``data.tokenizer_sample`` characters of
training text spread over the corpus (all of it when the corpus is smaller).

The key hashes the files' identities (``sources.source_identity``: names, sizes, modification
times, sampled blocks; or the user's manifest) and the tokenizer and split settings, so a
second run, or another trial of a sweep, reuses the entry without reading the text. An entry is
built in ``.<key>.partial/`` and renamed into place when complete: an interrupted preparation
continues from its last finished shard (``progress.json``), bad input removes the partial
folder, and a half-built entry is never used.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import shutil
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from alcot.common.files import atomic_write_json
from alcot.common.typed import ConfigError

from . import tokenize_worker
from .config import DataConfig
from .sources import corpus_bytes, iter_documents, source_identity
from .tokenizer import check_vocab, eos_id, load_tokenizer, train_bpe

FORMAT = 2
CHUNK_CHARS = 1 << 18  # characters of text per tokenizer task


@dataclass
class PreparedData:
    root: Path
    train_prefixes: list[Path]
    val_prefixes: list[Path]
    dtype: str
    n_train: int
    n_val: int
    vocab_size: int  # the model's vocabulary (before padding to a multiple of 64)
    eos_id: int
    tokenizer_path: Path | None
    key: str
    cache_hit: bool
    tokenizer_vocab: int = 0
    docs: dict = field(default_factory=dict)

    @property
    def train_bins(self) -> list[Path]:
        return [Path(f"{p}.bin") for p in self.train_prefixes]

    @property
    def val_bins(self) -> list[Path]:
        return [Path(f"{p}.bin") for p in self.val_prefixes]

    @property
    def train_path(self) -> Path:
        """The training tokens' file, when they are one shard."""
        return _single(self.train_bins)

    @property
    def val_path(self) -> Path:
        return _single(self.val_bins)

    def train_loader(self, seq_len, batch_size, seed, rank=0, world=1, samples=None):
        """The training batches (``samples``, the run's total, is not needed: epochs repeat)."""
        from .loader import PackedLoader

        return PackedLoader(self.train_bins, self.dtype, seq_len, batch_size, seed, rank, world)

    def eval_batches(self, seq_len, batch_size, max_batches):
        from .loader import eval_batches

        return eval_batches(self.val_bins, self.dtype, seq_len, batch_size, max_batches)


def _single(paths: list[Path]) -> Path:
    if len(paths) != 1:
        raise ValueError(f"the tokens are in {len(paths)} shards; use the *_bins lists")
    return paths[0]


def _tokenizer_identity(cfg: DataConfig) -> dict:
    if cfg.tokenizer:
        tok = load_tokenizer(Path(cfg.tokenizer))
        return {"sha256": hashlib.sha256(tok.to_str().encode()).hexdigest()}
    return {"bpe": "byte-level", "vocab_size": cfg.vocab_size, "sample": cfg.tokenizer_sample}


def cache_key(cfg: DataConfig) -> str:
    settings = {
        "format": FORMAT,
        "input": source_identity(cfg),
        "tokenizer": _tokenizer_identity(cfg),
        "val_fraction": cfg.val_fraction,
        "split_seed": cfg.split_seed,
        "shard_tokens": cfg.shard_tokens,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]


def _load(entry: Path, key: str, cfg: DataConfig) -> PreparedData | None:
    try:
        m = json.loads((entry / "manifest.json").read_text())
        if m.get("format") != FORMAT:
            return None
        itemsize = np.dtype(m["dtype"]).itemsize
        for split in ("train", "val"):
            for shard in m["shards"][split]:
                if (entry / f"{shard['prefix']}.bin").stat().st_size != shard["tokens"] * itemsize:
                    return None
                (entry / f"{shard['prefix']}.idx").stat()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return PreparedData(
        root=entry,
        train_prefixes=[entry / s["prefix"] for s in m["shards"]["train"]],
        val_prefixes=[entry / s["prefix"] for s in m["shards"]["val"]],
        dtype=m["dtype"],
        n_train=m["n_train"],
        n_val=m["n_val"],
        vocab_size=check_vocab(
            m["vocab_size"], cfg.vocab_size if cfg.tokenizer else None, str(cfg.tokenizer)
        ),
        eos_id=m["eos_id"],
        tokenizer_path=entry / "tokenizer.json",
        key=key,
        cache_hit=True,
        tokenizer_vocab=m["vocab_size"],
        docs={"train": m["docs_train"], "val": m["docs_val"]},
    )


def prepare(cfg: DataConfig, cache_root: str | Path, log=print):
    """Return the cached token files for ``cfg``, building them on first use. Megatron data
    (``data.source: megatron``) is opened where it is (``megatron.py``)."""
    if cfg.source == "megatron":
        from .megatron import open_megatron

        return open_megatron(cfg, cache_root)
    key = cache_key(cfg)
    root = Path(cache_root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    entry = root / key
    hit = _load(entry, key, cfg)
    if hit is not None:
        return hit
    with open(root / f".{key}.lock", "w") as lock:  # concurrent trials build an entry once
        fcntl.flock(lock, fcntl.LOCK_EX)
        hit = _load(entry, key, cfg)
        if hit is not None:
            return hit
        partial = root / f".{key}.partial"
        try:
            build(cfg, partial, log=log, entry_name=str(entry))
        except ConfigError:
            shutil.rmtree(partial, ignore_errors=True)  # bad input: nothing half-written
            raise
        if entry.exists():  # a stale, incomplete entry
            shutil.rmtree(entry)
        os.replace(partial, entry)
    built = _load(entry, key, cfg)
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


def check_enough(cfg: DataConfig, data) -> None:
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


# ------------------------------------------------------------------------------ building
def _split_flags(cfg: DataConfig, forced: dict[int, bool]) -> Iterator[tuple[int, str, bool]]:
    """(index, document, is_validation) in source order: each document is held out with
    probability ``val_fraction`` (seeded by ``split_seed``)."""
    rng = random.Random(cfg.split_seed)
    for i, doc in enumerate(iter_documents(cfg)):
        v = rng.random() < cfg.val_fraction
        yield i, doc, forced.get(i, v)


def bpe_sample(cfg: DataConfig, forced: dict[int, bool]) -> Iterator[str]:
    """Training documents for the BPE: all of them up to ``tokenizer_sample`` characters, or,
    for a larger corpus (text, jsonl: size known from the files), each with probability
    sample / size, so the sample spreads over the whole corpus."""
    total = corpus_bytes(cfg)
    p = 1.0 if not total else min(1.0, cfg.tokenizer_sample / total)
    pick = random.Random(cfg.split_seed + 7919)
    budget = cfg.tokenizer_sample
    for _, doc, is_val in _split_flags(cfg, forced):
        if is_val or (p < 1.0 and pick.random() >= p):
            continue
        yield doc
        budget -= len(doc)
        if budget <= 0:
            return


def _chunks(flags: Iterator[tuple[int, str, bool]], skip: int):
    docs, vals, size = [], [], 0
    for i, doc, is_val in flags:
        if i < skip:
            continue
        docs.append(doc)
        vals.append(is_val)
        size += len(doc)
        if size >= CHUNK_CHARS:
            yield docs, vals
            docs, vals, size = [], [], 0
    if docs:
        yield docs, vals


def _encoded(cfg: DataConfig, tok_path: Path, eos: int, dtype: str, skip: int, forced):
    """(token ids, per-document lengths, validation flags) of each chunk, in order, from
    ``data.workers`` processes (in this process when 1), at most 2 chunks per worker in
    flight."""
    chunks = _chunks(_split_flags(cfg, forced), skip)
    workers = cfg.workers or available_cores()
    if workers == 1:
        tokenize_worker.init(str(tok_path), eos, dtype)
        for docs, vals in chunks:
            ids, lengths = tokenize_worker.encode(docs)
            yield ids, lengths, vals
        return
    pool = tokenize_worker.Pool(workers, str(tok_path), eos, dtype)
    try:
        pending = deque()
        for docs, vals in chunks:
            pending.append((pool.submit(docs), vals))
            if len(pending) >= 2 * workers:
                w, v = pending.popleft()
                yield (*pool.result(w), v)
        while pending:
            w, v = pending.popleft()
            yield (*pool.result(w), v)
    finally:
        pool.close()


def available_cores() -> int:
    """The cores this process may run on (a Slurm or container limit, not the whole node)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class _Shards:
    """The current train and validation shards (Megatron-Core's IndexedDatasetBuilder) and
    the record of finished ones (``progress.json``)."""

    def __init__(self, out: Path, dtype: str, progress: dict):
        self.out, self.dtype, self.progress = out, np.dtype(dtype).type, progress
        self.builders = None

    def _open(self):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        n = len(self.progress["segments"])
        self.seg = {s: {"prefix": f"{s}_{n:05d}", "tokens": 0, "docs": 0} for s in ("train", "val")}
        self.builders = {
            s: IndexedDatasetBuilder(str(self.out / f"{s}_{n:05d}.bin"), dtype=self.dtype)
            for s in ("train", "val")
        }

    def add(self, ids: np.ndarray, lengths: np.ndarray, vals: list[bool], limit: int) -> None:
        """Append a chunk's documents; a shard pair is closed once its training shard holds
        ``limit`` tokens."""
        pos = 0
        for n, v in zip(lengths.tolist(), vals, strict=True):
            if self.builders is None:
                self._open()
            split = "val" if v else "train"
            self.builders[split].add_document(ids[pos : pos + n], [n])
            self.seg[split]["tokens"] += n
            self.seg[split]["docs"] += 1
            self.progress["docs_done"] += 1
            pos += n
            if self.seg["train"]["tokens"] >= limit:
                self.close()

    def close(self) -> None:
        if self.builders is None:
            return
        for s, b in self.builders.items():
            b.finalize(str(self.out / f"{self.seg[s]['prefix']}.idx"))
        self.progress["segments"].append(self.seg)
        atomic_write_json(self.out / "progress.json", self.progress)
        self.builders = None


def build(cfg: DataConfig, out: Path, log=print, entry_name: str = "", forced=None) -> dict:
    """Tokenise ``cfg``'s documents into ``out`` (continuing an interrupted build there)."""
    forced = forced or {}
    out.mkdir(parents=True, exist_ok=True)
    progress_file = out / "progress.json"
    progress = {"segments": [], "docs_done": 0, "forced": {}}
    if progress_file.exists():
        old = json.loads(progress_file.read_text())
        if old.get("forced") == {str(k): v for k, v in forced.items()}:
            progress = old
    progress["forced"] = {str(k): v for k, v in forced.items()}
    tok_path = out / "tokenizer.json"
    if cfg.tokenizer:
        tok = load_tokenizer(Path(cfg.tokenizer))
        where = str(cfg.tokenizer)
    elif tok_path.exists() and progress["docs_done"]:
        tok = load_tokenizer(tok_path)
        where = "the trained BPE"
    else:
        log(
            f"training a byte-level BPE ({cfg.vocab_size}) on up to {cfg.tokenizer_sample:,} "
            f"characters of {_source_name(cfg)}"
        )
        tok = train_bpe(bpe_sample(cfg, forced), cfg.vocab_size)
        where = "the trained BPE"
    vocab = tok.get_vocab_size()
    eos = eos_id(tok, where)
    if cfg.tokenizer:
        check_vocab(vocab, cfg.vocab_size, where)
    tok.save(str(tok_path))
    dtype = "uint16" if vocab <= np.iinfo(np.uint16).max + 1 else "int32"
    if progress["docs_done"]:
        log(
            f"continuing the preparation of {entry_name or out} after "
            f"{progress['docs_done']} documents ({len(progress['segments'])} shards)"
        )
    else:
        log(f"tokenising {_source_name(cfg)} into {entry_name or out}")
    shards = _Shards(out, dtype, progress)
    for ids, lengths, vals in _encoded(cfg, tok_path, eos, dtype, progress["docs_done"], forced):
        shards.add(ids, lengths, vals, cfg.shard_tokens)
    shards.close()
    segs = progress["segments"]
    n_docs = progress["docs_done"]
    if n_docs < 2:
        raise ConfigError("data.path", _too_few_documents(cfg, n_docs))
    docs = {s: sum(g[s]["docs"] for g in segs) for s in ("train", "val")}
    if not forced and (docs["train"] == 0 or docs["val"] == 0):
        # always keep at least one document on each side: the first held out, the last not
        for f in out.iterdir():
            f.unlink()
        return build(cfg, out, log, entry_name, forced={0: True, n_docs - 1: False})
    shard_lists = {}
    for s in ("train", "val"):
        shard_lists[s] = []
        for g in segs:
            if g[s]["docs"]:
                shard_lists[s].append(g[s])
            else:  # no document of this split in that part of the corpus
                for ext in (".bin", ".idx"):
                    (out / f"{g[s]['prefix']}{ext}").unlink(missing_ok=True)
    manifest = {
        "format": FORMAT,
        "dtype": dtype,
        "vocab_size": vocab,
        "eos_id": eos,
        "n_train": sum(g["tokens"] for g in shard_lists["train"]),
        "n_val": sum(g["tokens"] for g in shard_lists["val"]),
        "docs_train": docs["train"],
        "docs_val": docs["val"],
        "shards": shard_lists,
        "source": cfg.source,
        "path": str(cfg.path or ""),
        "tokenizer": cfg.tokenizer or f"byte-level BPE, {cfg.vocab_size}",
    }
    progress_file.unlink()
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest
