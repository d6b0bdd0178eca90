"""Perplexity and bits per byte of a loaded run on any text file (plain text or JSONL),
scored with a sliding window."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from alcot.common.files import JSONLineError, read_jsonl
from alcot.common.typed import ConfigError
from alcot.orchestrator.evaluation.loading import LoadedRun
from alcot.orchestrator.evaluation.scoring import Stats, forward_logprobs

TEXT_SUFFIXES_JSONL = (".jsonl", ".json")


def read_documents(path: Path, text_field: str = "text") -> list[str]:
    """Documents of a UTF-8 text file (one document) or a jsonl file (one per line)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError("--text", f"{path} does not exist")
    data = path.read_bytes()
    if b"\x00" in data[: 1 << 20]:
        raise ConfigError("--text", f"{path} looks binary (it has NUL bytes), not UTF-8 text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ConfigError(
            "--text", f"{path} is not valid UTF-8 (byte {err.start}, line {line}): convert it"
        ) from None
    if path.suffix.lower() not in TEXT_SUFFIXES_JSONL:
        if not text.strip():
            raise ConfigError("--text", f"{path} is empty")
        return [text]
    docs = []
    try:
        for lineno, rec in read_jsonl(text.splitlines()):
            if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str):
                raise ConfigError(
                    "--text-field", f"{path}:{lineno} has no text field {text_field!r}"
                )
            if rec[text_field].strip():
                docs.append(rec[text_field])
    except JSONLineError as err:
        raise ConfigError("--text", f"{path}:{err.lineno}: not JSON ({err.error})") from None
    if not docs:
        raise ConfigError("--text", f"{path} has no documents")
    return docs


def token_stream(loaded: LoadedRun, docs: Iterable[str]) -> tuple[list[int], int]:
    """Documents tokenised and joined by the end-of-text token, as training packs them; and
    their UTF-8 byte count."""
    ids: list[int] = []
    n_bytes = 0
    for enc, doc in zip(loaded.tokenizer.encode_batch(list(docs)), docs, strict=True):
        ids.extend(enc.ids)
        ids.append(loaded.eos_id)
        n_bytes += len(doc.encode("utf-8"))
    return ids, n_bytes


def sliding_nll(
    loaded: LoadedRun,
    ids: Sequence[int],
    stride: int | None = None,
    batch_size: int = 8,
    stats: Stats | None = None,
) -> tuple[float, int]:
    """(summed negative log-likelihood in nats, tokens scored) of every token after the first,
    in windows of the model's context moved by ``stride`` (default: the context, i.e. disjoint
    windows exactly as training's validation reads them). Each token is scored once, with as
    much preceding context as its window holds."""
    window = loaded.seq_len
    stride = stride or window
    if not 1 <= stride <= window:
        raise ConfigError("--stride", f"must be in [1, {window}], got {stride}")
    n = len(ids)
    if n < 2:
        raise ConfigError("--text", "fewer than two tokens: nothing to score")
    pieces = []  # (inputs, targets, score from index)
    scored_to = 0  # targets ids[1 : scored_to + 1] are done
    begin = 0
    while scored_to < n - 1:
        end = min(begin + window, n - 1)
        inputs = list(ids[begin:end])
        targets = list(ids[begin + 1 : end + 1])
        first_new = scored_to - begin  # targets before this index were scored already
        pieces.append((inputs, targets, max(first_new, 0)))
        scored_to = end
        begin += stride
    nll, count = 0.0, 0
    for start in range(0, len(pieces), batch_size):
        chunk = pieces[start : start + batch_size]
        logp = forward_logprobs(loaded.model, [p[0] for p in chunk], loaded.eos_id, stats)
        for j, (inputs, targets, skip) in enumerate(chunk):
            t = torch.tensor(targets[skip:], dtype=torch.long)
            lp = logp[j, skip : len(inputs)].gather(-1, t[:, None])
            nll -= float(lp.double().sum())
            count += len(t)
    return nll, count


def text_metrics(loaded: LoadedRun, path: Path, stride=None, batch_size=8, text_field="text"):
    """Perplexity per token and bits per byte of one file, with what the forwards cost."""
    docs = read_documents(path, text_field)
    ids, n_bytes = token_stream(loaded, docs)
    stats = Stats()
    nll, count = sliding_nll(loaded, ids, stride, batch_size, stats)
    return {
        "ppl": math.exp(min(nll / count, 50.0)),
        "loss": nll / count,
        "bits_per_byte": nll / math.log(2) / max(n_bytes, 1),
        "tokens": count,
        "bytes": n_bytes,
        "documents": len(docs),
        **{k: v for k, v in stats.summary().items() if k != "positions"},
    }


def corpus_name(path: Path) -> str:
    """A metric-safe name for a text file (its stem)."""
    import re

    return re.sub(r"[^\w.\-]", "_", Path(path).stem) or "text"
