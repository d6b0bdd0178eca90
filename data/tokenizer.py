"""Tokenizers: a byte-level BPE trained here, or one the user has (a ``tokenizer.json`` file
or a local Hugging Face tokenizer folder), all as Hugging Face ``tokenizers`` objects."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from alcot.common.typed import ConfigError

EOS = "<|endoftext|>"


def train_bpe(docs: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style) on ``docs``; ``<|endoftext|>`` is id 0."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer)
    return tok


def load_tokenizer(path: Path, field: str = "data.tokenizer") -> Tokenizer:
    """A ``tokenizer.json``, or a folder holding one (a Hugging Face tokenizer saved with
    ``save_pretrained``, e.g. GPT-NeoX's), or a folder that ``transformers`` can turn into a
    fast tokenizer (vocab.json + merges.txt). Local files only: nothing is downloaded."""
    path = Path(path).expanduser()
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            path = path / "tokenizer.json"
        else:
            return _from_transformers(path, field)
    if not path.is_file():
        raise ConfigError(field, f"{path} is neither a tokenizer.json nor a tokenizer folder")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # the library raises a bare Exception on a malformed file
        raise ConfigError(field, f"{path} is not a tokenizer.json ({err})") from None


def _from_transformers(folder: Path, field: str) -> Tokenizer:
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, use_fast=True)
    except Exception as err:
        raise ConfigError(
            field, f"{folder} has no tokenizer.json and is not a tokenizer folder ({err})"
        ) from None
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(field, f"{folder}: no fast (Rust) tokenizer can be made from it")
    return backend


def eos_id(tok: Tokenizer, where: str, field: str = "data.tokenizer") -> int:
    eos = tok.token_to_id(EOS)
    if eos is None:
        raise ConfigError(field, f"{where} has no {EOS!r} token (the end-of-document marker)")
    return eos


def check_vocab(tok_size: int, cfg_vocab: int | None, where: str) -> int:
    """The model's vocabulary for a tokenizer of ``tok_size`` tokens: ``data.vocab_size`` when
    set (it must hold every token id), else the tokenizer's own size."""
    if cfg_vocab is None:
        return tok_size
    if tok_size > cfg_vocab:
        raise ConfigError(
            "data.vocab_size",
            f"the tokenizer {where} has {tok_size} tokens, more than data.vocab_size = "
            f"{cfg_vocab} (the model's vocabulary, model.vocab_size, is set from it): raise "
            "data.vocab_size or leave it unset",
        )
    return cfg_vocab
