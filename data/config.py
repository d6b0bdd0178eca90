"""Data settings (the ``data:`` section of a run config)."""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import Any

from alcot.model.typed import ConfigError, build

SOURCES = ("builtin", "text", "jsonl", "hf")


@dataclass
class DataConfig:
    """Where documents come from, how they are tokenised, and how they are cut into sequences.

    ``source``: ``builtin`` (generated, no download), ``text`` (a text file or a folder of
    .txt files; one document per file, or per blank-line-separated block with
    ``split_paragraphs``, e.g. WikiText's paragraphs),
    ``jsonl`` (one JSON object per line, text in ``text_field``), ``hf`` (a Hugging Face dataset
    saved with ``save_to_disk``, a local data file/folder, or a hub name when the network
    allows; ``hf_split`` picks the split).
    """

    source: str = "builtin"
    path: str | None = None
    text_field: str = "text"
    hf_split: str = "train"
    split_paragraphs: bool = False
    builtin_documents: int = 4000
    tokenizer: str | None = None  # a tokenizer.json to load; None = train a byte-level BPE
    vocab_size: int = 2048  # BPE vocabulary to train (ignored when a tokenizer is given)
    val_fraction: float = 0.05  # share of documents held out for validation
    split_seed: int = 0
    seq_len: int = 128
    cache_dir: str | None = None  # default: $ALCOT_HOME/cache
    encoding: str = "utf-8"  # of text and jsonl files; undecodable bytes are an error

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ConfigError("data.source", f"must be one of {SOURCES}, got {self.source!r}")
        if self.source != "builtin" and not self.path:
            raise ConfigError("data.path", f"source {self.source!r} needs a path")
        if not (0.0 < self.val_fraction < 1.0):
            raise ConfigError("data.val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        if self.seq_len < 2:
            raise ConfigError("data.seq_len", f"must be >= 2, got {self.seq_len}")
        if self.vocab_size < 260:
            raise ConfigError("data.vocab_size", "must be >= 260 (256 bytes + specials)")
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise ConfigError("data.encoding", f"unknown encoding {self.encoding!r}") from None
        if self.builtin_documents < 10:
            raise ConfigError("data.builtin_documents", "must be >= 10")

    @classmethod
    def from_dict(cls, d: dict[str, Any], prefix: str = "data") -> DataConfig:
        return build(cls, d, prefix)
