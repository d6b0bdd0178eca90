"""Files written whole or not at all, file checksums, and JSON-lines reading.

Notation: an *atomic write* puts the new content in a temporary file in the destination's own
folder (the same file system) and renames it over the destination with ``os.replace``, so a
reader sees the old file or the new one, never a half-written one. The temporary file's name
holds the writer's pid and a random part, so concurrent writers of one file never share it; it
starts with a dot and is removed if the write fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path, fsync: bool = False) -> Iterator[Path]:
    """A temporary path next to ``path`` for the caller to write (for writers that want a path,
    such as ``Tokenizer.save``); on leaving the block it replaces ``path``. With ``fsync`` the
    file and then the folder's entry are flushed to disk. On an error the temporary file is
    removed and ``path`` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(path.parent)


def atomic_write(path: str | Path, data: str | bytes, fsync: bool = False) -> Path:
    """Write ``data`` (text as UTF-8, unchanged line ends) to ``path`` atomically; see
    :func:`atomic_path` for ``fsync``. Returns ``path``."""
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(raw)
    return path


def atomic_write_json(
    path: str | Path, obj: Any, indent: int | None = None, fsync: bool = False
) -> Path:
    """``obj`` as JSON (``json.dumps(obj, indent=indent)``) written atomically to ``path``."""
    return atomic_write(path, json.dumps(obj, indent=indent), fsync=fsync)


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class JSONLineError(ValueError):
    """A line of a JSON-lines input is not JSON. ``lineno`` counts from 1; ``error`` is the
    decoder's error."""

    def __init__(self, lineno: int, error: json.JSONDecodeError):
        self.lineno, self.error = lineno, error
        super().__init__(f"line {lineno}: not JSON ({error})")


def read_jsonl(
    source: str | Path | Iterable[str], skip_bad: bool = False, encoding: str | None = None
) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` for each non-blank line of a JSON-lines input, in order.

    ``source`` is a file (read whole, decoded with ``encoding``, the locale's by default) or
    the lines themselves (for a caller that streams or decodes the file its own way). A line
    that is not JSON raises :class:`JSONLineError`, or with ``skip_bad`` is skipped (a journal
    whose last line a kill tore mid-write). The values are whatever each line holds: checking
    their shape is the caller's."""
    if isinstance(source, str | Path):
        lines: Iterable[str] = Path(source).read_text(encoding=encoding).splitlines()
    else:
        lines = source
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            if skip_bad:
                continue
            raise JSONLineError(lineno, err) from None
        yield lineno, value
