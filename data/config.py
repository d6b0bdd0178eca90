"""Data settings (the ``data:`` section of a run config)."""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import Any

from alcot.common.typed import ConfigError, build

SOURCES = ("builtin", "text", "jsonl", "hf", "megatron")
DEFAULT_BPE_VOCAB = 2048


@dataclass
class DataConfig:
    """Where documents come from, how they are tokenised, and how they are cut into sequences.

    ``source``: ``builtin`` (generated, no download), ``text`` (a text file or a folder of
    .txt files; one document per file, or per blank-line-separated block with
    ``split_paragraphs``, e.g. WikiText's paragraphs),
    ``jsonl`` (one JSON object per line, text in ``text_field``), ``hf`` (a Hugging Face dataset
    saved with ``save_to_disk``, a local data file/folder, or a hub name when the network
    allows; ``hf_split`` picks the split), ``megatron`` (already tokenised Megatron-Core
    ``IndexedDataset`` files: ``path`` one ``.bin/.idx`` prefix or a list of them, ``weights`` a
    blend; read through Megatron-Core's ``GPTDataset`` and ``BlendedMegatronDatasetBuilder``).

    ``vocab_size``: the byte-level BPE's vocabulary when one is trained (default 2048); with a
    ``tokenizer`` or ``megatron`` data it is the model's vocabulary (at least the tokenizer's,
    e.g. 50304 for GPT-NeoX's 50277 tokens; default: the tokenizer's own size); ``megatron``
    data without a tokenizer needs it.
    """

    source: str = "builtin"
    path: str | list[str] | None = None
    text_field: str = "text"
    hf_split: str = "train"
    split_paragraphs: bool = False
    builtin_documents: int = 4000
    # a tokenizer.json, or a local Hugging Face tokenizer folder; None = train a byte-level BPE
    tokenizer: str | None = None
    vocab_size: int | None = None
    val_fraction: float = 0.05  # share of documents held out for validation
    split_seed: int = 0
    seq_len: int = 128
    cache_dir: str | None = None  # default: $ALCOT_HOME/cache
    encoding: str = "utf-8"  # of text and jsonl files; undecodable bytes are an error
    # preparation: tokenizer processes (0 = all cores), bytes of training text the BPE is
    # trained on (a deterministic sample spread over the corpus), tokens per output shard
    workers: int = 0
    tokenizer_sample: int = 100_000_000
    shard_tokens: int = 100_000_000
    # a file whose contents stand for the corpus in the cache key (e.g. a checksum list);
    # None = the files' names, sizes, modification times and sampled blocks
    manifest: str | None = None
    weights: list[float] | None = None  # megatron: blend weights, one per path

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ConfigError("data.source", f"must be one of {SOURCES}, got {self.source!r}")
        if self.source != "builtin" and not self.path:
            raise ConfigError("data.path", f"source {self.source!r} needs a path")
        if isinstance(self.path, list):
            if self.source != "megatron":
                raise ConfigError("data.path", "a list of paths needs source 'megatron'")
            if not all(isinstance(p, str) and p for p in self.path):
                raise ConfigError("data.path", "every entry must be a path prefix")
        if self.weights is not None:
            if self.source != "megatron":
                raise ConfigError("data.weights", "blend weights need source 'megatron'")
            n = len(self.path) if isinstance(self.path, list) else 1
            if len(self.weights) != n or any(w <= 0 for w in self.weights):
                raise ConfigError(
                    "data.weights", f"needs {n} positive weights (one per data.path entry)"
                )
        if not (0.0 < self.val_fraction < 1.0):
            raise ConfigError("data.val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        if self.seq_len < 2:
            raise ConfigError("data.seq_len", f"must be >= 2, got {self.seq_len}")
        if self.vocab_size is None and not self.tokenizer:
            if self.source == "megatron":
                raise ConfigError(
                    "data.vocab_size",
                    "megatron data needs its vocabulary: set data.vocab_size, or data.tokenizer "
                    "to the tokenizer that made it",
                )
            self.vocab_size = DEFAULT_BPE_VOCAB
        if self.vocab_size is not None and self.vocab_size < 260 and self.source != "megatron":
            raise ConfigError("data.vocab_size", "must be >= 260 (256 bytes + specials)")
        if self.vocab_size is not None and self.vocab_size < 2:
            raise ConfigError("data.vocab_size", "must be >= 2")
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise ConfigError("data.encoding", f"unknown encoding {self.encoding!r}") from None
        if self.builtin_documents < 10:
            raise ConfigError("data.builtin_documents", "must be >= 10")
        if self.workers < 0:
            raise ConfigError("data.workers", "must be >= 0 (0: all cores)")
        if self.tokenizer_sample < 1_000:
            raise ConfigError("data.tokenizer_sample", "must be >= 1000 bytes")
        if self.shard_tokens < 1_000:
            raise ConfigError("data.shard_tokens", "must be >= 1000")

    @classmethod
    def from_dict(cls, d: dict[str, Any], prefix: str = "data") -> DataConfig:
        return build(cls, d, prefix)
