"""Read documents from the configured source, in a deterministic order."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from alcot.model.typed import ConfigError

from .config import DataConfig
from .corpus import builtin_documents

_BLANK_LINE = re.compile(r"\n[ \t]*\n")


def read_text(path: Path, encoding: str) -> str:
    """A text file's contents; a binary file or bytes that ``encoding`` cannot decode are a
    ConfigError naming the file (never silently replaced characters)."""
    data = path.read_bytes()
    if b"\x00" in data[: 1 << 20]:
        raise ConfigError(
            "data.path", f"{path} looks binary (it has NUL bytes), not text: point at a text file"
        )
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ConfigError(
            "data.path",
            f"{path} is not valid {encoding} (byte {err.start}, line {line}): convert it, or set "
            "data.encoding to its encoding (e.g. latin-1)",
        ) from None


def iter_documents(cfg: DataConfig) -> Iterator[str]:
    """Yield the source's documents (non-empty strings) in a fixed order."""
    if cfg.source == "builtin":
        yield from builtin_documents(cfg.builtin_documents)
        return
    path = Path(cfg.path).expanduser()
    if cfg.source in ("text", "jsonl") and not path.exists():
        raise ConfigError("data.path", f"{path} does not exist")
    if cfg.source == "text":
        files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
        if not files:
            raise ConfigError("data.path", f"no .txt files under {path}")
        for f in files:
            text = read_text(f, cfg.encoding)
            if cfg.split_paragraphs:  # blocks separated by blank (or whitespace-only) lines
                yield from (p.strip() for p in _BLANK_LINE.split(text) if p.strip())
            elif text.strip():
                yield text
    elif cfg.source == "jsonl":
        files = sorted(path.rglob("*.jsonl")) if path.is_dir() else [path]
        for f in files:
            for lineno, line in enumerate(read_text(f, cfg.encoding).splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ConfigError("data.path", f"{f}:{lineno}: not JSON ({err})") from None
                if not isinstance(record, dict) or cfg.text_field not in record:
                    raise ConfigError(
                        "data.text_field", f"{f}:{lineno} has no field {cfg.text_field!r}"
                    )
                text = record[cfg.text_field]
                if isinstance(text, str) and text.strip():
                    yield text
    else:
        yield from _hf_documents(cfg, path)


def _hf_documents(cfg: DataConfig, path: Path) -> Iterator[str]:
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - datasets is a declared dependency
        raise ConfigError("data.source", f"'hf' needs the datasets package ({err})") from None
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[cfg.hf_split]
    elif path.exists():
        suffix = path.suffix.lstrip(".") if path.is_file() else "json"
        builder = "json" if suffix == "jsonl" else suffix
        ds = datasets.load_dataset(builder, data_files=str(path), split=cfg.hf_split)
    else:
        ds = datasets.load_dataset(cfg.path, split=cfg.hf_split)  # a hub name
    if cfg.text_field not in ds.column_names:
        raise ConfigError("data.text_field", f"dataset has no column {cfg.text_field!r}")
    for text in ds[cfg.text_field]:
        if isinstance(text, str) and text.strip():
            yield text
