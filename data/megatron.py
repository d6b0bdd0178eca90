"""Already tokenised corpora in Megatron-Core's ``IndexedDataset`` format (``.bin`` + ``.idx``),
read through Megatron-Core's own dataset classes.

``data.source: megatron`` with ``data.path`` one prefix or a list of them (``data.weights`` a
blend): samples, document boundaries and their deterministic order come from ``GPTDataset``
(one sample = ``seq_len + 1`` tokens packed across documents, shuffled by the run's seed) and
``BlendedMegatronDatasetBuilder`` (the train/validation split by ``data.val_fraction``, the
blend). Its index files are cached under ``<cache>/megatron-<key>/``. Training draws global
sample k at its k-th draw; every data-parallel rank keeps its slice of each global batch, and
the loader's state (the number of samples drawn) resumes a run exactly.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from alcot.common.files import atomic_path
from alcot.common.typed import ConfigError

from .config import DataConfig
from .sources import file_identity
from .tokenizer import check_vocab, eos_id, load_tokenizer

CHECK_TOKENS = 1 << 20  # tokens read at each of 3 places of a .bin to check the vocabulary


class _Tokenizer:
    """What ``GPTDatasetConfig`` asks of a tokenizer: its size and end-of-document id (no
    padding id: Megatron then pads with -1, which never occurs in the data)."""

    def __init__(self, vocab_size: int, eod: int):
        self.vocab_size, self.eod = vocab_size, eod
        self.unique_identifiers = {"class": "alcot", "vocab_size": vocab_size, "eod": eod}


def prefixes(cfg: DataConfig) -> list[str]:
    paths = cfg.path if isinstance(cfg.path, list) else [cfg.path]
    out = []
    for p in paths:
        p = str(Path(p).expanduser())
        for ext in (".bin", ".idx"):
            if p.endswith(ext):
                p = p[: -len(ext)]
        out.append(str(Path(p).resolve()))
    return out


def _index(prefix: str):
    """Megatron-Core's IndexedDataset of ``prefix``, checked: both files there, the index
    readable, and the .bin exactly as long as the index says."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for ext in (".idx", ".bin"):
        if not Path(prefix + ext).is_file():
            raise ConfigError("data.path", f"{prefix}{ext} does not exist (a .bin/.idx prefix)")
    from megatron.core.datasets.indexed_dataset import _INDEX_HEADER

    with open(prefix + ".idx", "rb") as f:
        head = f.read(len(_INDEX_HEADER) + 8)
    if not head.startswith(_INDEX_HEADER) or int.from_bytes(head[-8:], "little") != 1:
        raise ConfigError(
            "data.path", f"{prefix}.idx is not a Megatron-Core index (no MMIDIDX version 1 header)"
        )
    try:
        ds = IndexedDataset(prefix, mmap=True)
    except (AssertionError, ValueError, KeyError, OSError, IndexError) as err:
        raise ConfigError(
            "data.path", f"{prefix}.idx is not a Megatron-Core index ({type(err).__name__}: {err})"
        ) from None
    idx = ds.index
    size = Path(prefix + ".bin").stat().st_size
    itemsize = np.dtype(idx.dtype).itemsize
    want = (
        int(idx.sequence_pointers[-1]) + int(idx.sequence_lengths[-1]) * itemsize
        if len(idx.sequence_lengths)
        else 0
    )
    if want != size:
        raise ConfigError(
            "data.path",
            f"{prefix}.idx does not match its .bin: the index describes {want} bytes of "
            f"{np.dtype(idx.dtype).name} tokens, {prefix}.bin has {size}",
        )
    if len(idx.sequence_lengths) < 2:
        raise ConfigError(
            "data.path",
            f"{prefix} holds {len(idx.sequence_lengths)} documents; "
            "training needs at least 2 (one is held out for validation)",
        )
    return ds


def _check_tokens(prefix: str, ds, vocab: int) -> None:
    """Token ids at the start, middle and end of the .bin are below the vocabulary."""
    tokens = np.memmap(prefix + ".bin", dtype=ds.index.dtype, mode="r")
    n = len(tokens)
    for start in {0, max(n // 2 - CHECK_TOKENS // 2, 0), max(n - CHECK_TOKENS, 0)}:
        block = tokens[start : start + CHECK_TOKENS]
        if len(block) and (int(block.max()) >= vocab or int(block.min()) < 0):
            bad = int(block.max()) if int(block.max()) >= vocab else int(block.min())
            raise ConfigError(
                "data.vocab_size",
                f"{prefix}.bin holds token id {bad}, outside the vocabulary of {vocab} "
                "(data.vocab_size, or data.tokenizer's size): set the vocabulary the data was "
                "tokenised with",
            )


@dataclass
class MegatronData:
    """Megatron data as the trainer sees it (the interface of ``prepare.PreparedData``)."""

    prefixes: list[str]
    weights: list[float] | None
    val_fraction: float
    cache: Path
    dtype: str
    n_train: int
    n_val: int
    vocab_size: int
    eos_id: int | None
    tokenizer_path: Path | None
    key: str
    cache_hit: bool = False
    root: Path = None
    docs: dict = field(default_factory=dict)
    tokenizer_vocab: int = 0
    _built: dict = field(default_factory=dict, repr=False)

    def _split(self) -> str:
        return f"{1.0 - self.val_fraction},{self.val_fraction},0"

    def datasets(self, seq_len: int, seed: int, train_samples: int, val_samples: int):
        """Megatron-Core's (train, validation) datasets for these sizes (built on every rank;
        the builder lets global rank 0 write the index files first)."""
        memo = (seq_len, seed, train_samples, val_samples)
        if memo not in self._built:
            self._built[memo] = self._build(*memo)
        return self._built[memo]

    def _build(self, seq_len: int, seed: int, train_samples: int, val_samples: int):
        from megatron.core.datasets.blended_megatron_dataset_builder import (
            BlendedMegatronDatasetBuilder,
        )
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

        config = GPTDatasetConfig(
            random_seed=seed,
            sequence_length=seq_len,
            blend=(list(self.prefixes), self.weights),
            split=self._split(),
            path_to_cache=str(self.cache / "indices"),
            tokenizer=_Tokenizer(self.vocab_size, self.eos_id if self.eos_id is not None else 0),
            reset_position_ids=False,
            reset_attention_mask=False,
            eod_mask_loss=False,
            create_attention_mask=False,
        )
        builder = BlendedMegatronDatasetBuilder(
            GPTDataset, [train_samples, val_samples, 0], lambda: True, config
        )
        train, val, _ = builder.build()
        return train, val

    def train_loader(self, seq_len, batch_size, seed, rank=0, world=1, samples=None):
        train, _ = self.datasets(seq_len, seed, max(int(samples or batch_size), batch_size), 1)
        return MegatronLoader(train, batch_size, rank, world)

    def eval_batches(self, seq_len, batch_size, max_batches):
        """The first ``max_batches`` batches of the validation split, in the library's order
        (the same every evaluation; seed 0, so every run sees the same ones)."""
        _, val = self.datasets(seq_len, 0, 1, batch_size * max_batches)
        n = min(len(val), batch_size * max_batches)
        if n < 1:
            raise ValueError("too few validation tokens for one sequence")
        for start in range(0, n, batch_size):
            yield _stack(val, range(start, min(n, start + batch_size)))


def _stack(ds, indices) -> tuple[torch.Tensor, torch.Tensor]:
    samples = [ds[int(i)] for i in indices]
    x = torch.stack([s["tokens"] for s in samples]).long()
    y = torch.stack([s["labels"] for s in samples]).long()
    return x, y


class MegatronLoader:
    """Global sample k of a Megatron-Core dataset at the k-th draw (wrapping around past its
    end); each data-parallel rank keeps its slice of every global batch. ``state_dict`` is the
    number of samples drawn, so a resumed run continues exactly."""

    def __init__(self, dataset, batch_size: int, rank: int = 0, world: int = 1):
        if batch_size % world:
            raise ValueError(f"batch size {batch_size} is not divisible by {world} ranks")
        if len(dataset) < 1:
            raise ValueError("too few training tokens for one sequence")
        self.dataset, self.batch_size, self.rank, self.world = dataset, batch_size, rank, world
        self.index = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        per_rank = self.batch_size // self.world
        first = self.index + self.rank * per_rank
        self.index += self.batch_size
        n = len(self.dataset)
        return _stack(self.dataset, [(first + j) % n for j in range(per_rank)])

    def state_dict(self) -> dict[str, int]:
        return {"epoch": 0, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.index = int(state["index"])


def open_megatron(cfg: DataConfig, cache_root) -> MegatronData:
    """Check the named .bin/.idx prefixes and describe them for the trainer. Nothing is
    copied; Megatron-Core's sample indices are built when training starts."""
    paths = prefixes(cfg)
    indexed = [_index(p) for p in paths]
    tok_file, eos, tok_vocab = None, None, 0
    if cfg.tokenizer:
        tok = load_tokenizer(Path(cfg.tokenizer))
        tok_vocab = tok.get_vocab_size()
        eos = eos_id(tok, str(cfg.tokenizer))
        vocab = check_vocab(tok_vocab, cfg.vocab_size, str(cfg.tokenizer))
    else:
        vocab = cfg.vocab_size
    for p, ds in zip(paths, indexed, strict=True):
        _check_tokens(p, ds, vocab)
    ident = {
        "files": [
            file_identity(Path(p + ext)) | {"path": p + ext}
            for p in paths
            for ext in (".idx", ".bin")
        ],
        "weights": cfg.weights,
        "val_fraction": cfg.val_fraction,
        "vocab": vocab,
    }
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]
    cache = Path(cache_root).expanduser().resolve() / f"megatron-{key}"
    cache.mkdir(parents=True, exist_ok=True)
    if cfg.tokenizer:
        tok_file = cache / "tokenizer.json"
        if not tok_file.exists():
            with atomic_path(tok_file) as tmp:
                tok.save(str(tmp))
    n_train = n_val = docs_train = docs_val = 0
    for ds in indexed:
        lengths = ds.index.sequence_lengths
        n = len(lengths)
        cut = int(round((1.0 - cfg.val_fraction) * n))
        n_train += int(lengths[:cut].sum(dtype=np.int64))
        n_val += int(lengths[cut:].sum(dtype=np.int64))
        docs_train, docs_val = docs_train + cut, docs_val + n - cut
    return MegatronData(
        prefixes=paths,
        weights=list(cfg.weights) if cfg.weights else None,
        val_fraction=cfg.val_fraction,
        cache=cache,
        dtype=np.dtype(indexed[0].index.dtype).name,
        n_train=n_train,
        n_val=n_val,
        vocab_size=vocab,
        eos_id=eos,
        tokenizer_path=tok_file,
        key=key,
        root=Path(paths[0]).parent,
        docs={"train": docs_train, "val": docs_val},
        tokenizer_vocab=tok_vocab,
    )
