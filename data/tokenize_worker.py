"""The tokenizer processes of ``alcot data prepare`` (numpy and ``tokenizers`` only: a worker
starts in a fraction of a second and holds little memory)."""

from __future__ import annotations

import os

import numpy as np

_TOKENIZER = None
_EOS = 0
_DTYPE = np.uint16


def init(tokenizer_path: str, eos: int, dtype: str) -> None:
    """Load the tokenizer once per process; one thread each (the processes are the
    parallelism)."""
    global _TOKENIZER, _EOS, _DTYPE
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    _TOKENIZER = Tokenizer.from_file(tokenizer_path)
    _EOS, _DTYPE = eos, np.dtype(dtype)


def encode(docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The documents' token ids, each followed by the end-of-text token, back to back, and
    each document's length (end-of-text included)."""
    encs = _TOKENIZER.encode_batch(docs)
    lengths = np.fromiter((len(e.ids) + 1 for e in encs), dtype=np.int64, count=len(encs))
    out = np.empty(int(lengths.sum()), dtype=_DTYPE)
    pos = 0
    for e, n in zip(encs, lengths.tolist(), strict=True):
        out[pos : pos + n - 1] = e.ids
        out[pos + n - 1] = _EOS
        pos += n
    return out, lengths
