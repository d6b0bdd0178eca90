"""Read documents from the configured source, in a deterministic order, as a stream.

Text and JSONL files are read in blocks and decoded incrementally, so memory stays bounded
whatever the corpus size (one document at a time; a whole file is one document only without
``split_paragraphs``). ``source_identity`` describes the input for the token cache's key from
the files' names, sizes, modification times and a hash of sampled blocks (or a manifest file
the user gives), without reading all of the text.
"""

from __future__ import annotations

import codecs
import hashlib
from collections.abc import Iterator
from pathlib import Path

from alcot.common.files import JSONLineError, read_jsonl
from alcot.common.typed import ConfigError

from .config import DataConfig
from .corpus import builtin_documents

BLOCK = 1 << 20  # bytes read (and checked for NUL bytes) at a time
SAMPLE_BLOCK = 1 << 16  # bytes hashed at each sampled position of a file
SAMPLES_PER_FILE = 8


def read_text(path: Path, encoding: str) -> str:
    """A text file's contents; a binary file or bytes that ``encoding`` cannot decode are a
    ConfigError naming the file (never silently replaced characters)."""
    return "\n".join(iter_lines(path, encoding))


def _undecodable(path: Path, encoding: str, byte: int, line: int) -> ConfigError:
    return ConfigError(
        "data.path",
        f"{path} is not valid {encoding} (byte {byte}, line {line}): convert it, or set "
        "data.encoding to its encoding (e.g. latin-1)",
    )


def iter_lines(path: Path, encoding: str) -> Iterator[str]:
    """The file's lines (split at ``\\n`` only, without it), read in 1 MiB blocks. NUL bytes in
    the first block (a binary file) or undecodable bytes are a ConfigError naming the file."""
    decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    offset, lines_before, pending = 0, 0, ""
    with open(path, "rb") as f:
        while True:
            block = f.read(BLOCK)
            if offset == 0 and b"\x00" in block:
                raise ConfigError(
                    "data.path",
                    f"{path} looks binary (it has NUL bytes), not text: point at a text file",
                )
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as err:
                line = lines_before + block[: max(err.start, 0)].count(b"\n") + 1
                raise _undecodable(path, encoding, offset + max(err.start, 0), line) from None
            offset += len(block)
            lines_before += block.count(b"\n")
            if text:
                parts = (pending + text).split("\n")
                pending = parts.pop()
                yield from parts
            if not block:
                break
    yield pending


def _paragraphs(lines: Iterator[str]) -> Iterator[str]:
    """Blocks of lines separated by blank (or spaces-and-tabs-only) lines, stripped."""
    buf: list[str] = []
    for line in lines:
        if line.strip(" \t") == "":
            if buf:
                text = "\n".join(buf).strip()
                if text:
                    yield text
                buf = []
        else:
            buf.append(line)
    if buf:
        text = "\n".join(buf).strip()
        if text:
            yield text


def _files(cfg: DataConfig) -> list[Path]:
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise ConfigError("data.path", f"{path} does not exist")
    pattern = "*.txt" if cfg.source == "text" else "*.jsonl"
    files = sorted(path.rglob(pattern)) if path.is_dir() else [path]
    if not files:
        raise ConfigError("data.path", f"no {pattern[1:]} files under {path}")
    return files


def iter_documents(cfg: DataConfig) -> Iterator[str]:
    """Yield the source's documents (non-empty strings) in a fixed order."""
    if cfg.source == "builtin":
        yield from builtin_documents(cfg.builtin_documents)
        return
    if cfg.source == "megatron":
        raise ConfigError("data.source", "megatron data is already tokenised (no documents)")
    if cfg.source == "text":
        for f in _files(cfg):
            if cfg.split_paragraphs:
                yield from _paragraphs(iter_lines(f, cfg.encoding))
            else:
                text = read_text(f, cfg.encoding)
                if text.strip():
                    yield text
    elif cfg.source == "jsonl":
        for f in _files(cfg):
            try:
                for lineno, record in read_jsonl(iter_lines(f, cfg.encoding)):
                    if not isinstance(record, dict) or cfg.text_field not in record:
                        raise ConfigError(
                            "data.text_field", f"{f}:{lineno} has no field {cfg.text_field!r}"
                        )
                    text = record[cfg.text_field]
                    if isinstance(text, str) and text.strip():
                        yield text
            except JSONLineError as err:
                raise ConfigError(
                    "data.path", f"{f}:{err.lineno}: not JSON ({err.error})"
                ) from None
    else:
        yield from _hf_documents(cfg, Path(cfg.path).expanduser())


def _hf_dataset(cfg: DataConfig, path: Path):
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
    return ds


def _hf_documents(cfg: DataConfig, path: Path) -> Iterator[str]:
    ds = _hf_dataset(cfg, path)
    column = ds.select_columns([cfg.text_field])
    for batch in column.iter(batch_size=1000):  # memory-mapped Arrow, read in batches
        for text in batch[cfg.text_field]:
            if isinstance(text, str) and text.strip():
                yield text


def corpus_bytes(cfg: DataConfig) -> int | None:
    """The corpus's size on disk (text and jsonl files), or None when not known cheaply."""
    if cfg.source in ("text", "jsonl"):
        return sum(f.stat().st_size for f in _files(cfg))
    return None


def file_identity(path: Path, root: Path | None = None) -> dict:
    """Name, size, modification time and a hash of a few sampled blocks of one file."""
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        last = max(st.st_size - SAMPLE_BLOCK, 0)
        for i in range(SAMPLES_PER_FILE):
            f.seek(last * i // max(SAMPLES_PER_FILE - 1, 1))
            h.update(f.read(SAMPLE_BLOCK))
    name = str(path.relative_to(root)) if root is not None else path.name
    return {"name": name, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sample": h.hexdigest()}


def source_identity(cfg: DataConfig) -> dict:
    """What the cache key knows of the input: the settings that pick documents, and the files'
    identities (or the user's manifest file's hash)."""
    ident: dict = {"source": cfg.source}
    if cfg.source == "builtin":
        ident["documents"] = cfg.builtin_documents
        return ident
    ident.update(text_field=cfg.text_field, encoding=cfg.encoding)
    if cfg.source == "text":
        ident["split_paragraphs"] = cfg.split_paragraphs
    if cfg.manifest:
        m = Path(cfg.manifest).expanduser()
        if not m.is_file():
            raise ConfigError("data.manifest", f"{m} is not a file")
        ident["manifest"] = hashlib.sha256(m.read_bytes()).hexdigest()
        return ident
    path = Path(cfg.path).expanduser()
    if cfg.source in ("text", "jsonl"):
        root = path if path.is_dir() else path.parent
        ident["files"] = [file_identity(f, root) for f in _files(cfg)]
    elif path.exists():  # hf: a save_to_disk folder or local data files
        ident["hf_split"] = cfg.hf_split
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        root = path if path.is_dir() else path.parent
        ident["files"] = [file_identity(f, root) for f in files]
    else:  # a hub name: the name and split (the hub's own versioning is not consulted)
        ident.update(hub=cfg.path, hf_split=cfg.hf_split)
    return ident
