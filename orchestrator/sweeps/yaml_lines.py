"""YAML with line numbers, so a sweep error can say where in the file it is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def _walk(node, path: str, lines: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            name = str(key.value)
            sub = f"{path}.{name}" if path else name
            lines[sub] = key.start_mark.line + 1
            _walk(value, sub, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            sub = f"{path}[{i}]"
            lines[sub] = item.start_mark.line + 1
            _walk(item, sub, lines)


def load_with_lines(path: Path) -> tuple[Any, dict[str, int], str]:
    """(data, {dotted path: line}, the file's text) for a YAML file. Raises ``yaml.YAMLError``
    on bad YAML."""
    text = Path(path).read_text()
    data = yaml.safe_load(text)
    lines: dict[str, int] = {}
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    if node is not None:
        _walk(node, "", lines)
    return data, lines, text
