"""A run folder's records, read back: ``tracking.json`` (the experiment, run name, tags and
the MLflow run of each store), the journal ``metrics.jsonl`` and ``run_status.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from alcot.common.files import read_jsonl


# ------------------------------------------------------------------------------ run folder
def read_record(run_dir: Path) -> dict | None:
    """The folder's ``tracking.json``, or None without one. ``stores`` maps each tracking URI
    the folder was tracked in to its run there; ``uri``/``run_id`` are the latest."""
    path = Path(run_dir) / "tracking.json"
    if not path.exists():
        return None
    try:
        rec = json.loads(path.read_text())
    except ValueError:
        return None
    stores = rec.setdefault("stores", {})
    if rec.get("uri") and rec.get("run_id"):
        stores.setdefault(rec["uri"], rec["run_id"])
    return rec


def read_journal(run_dir: Path) -> list[dict]:
    """The folder's ``metrics.jsonl`` rows (``{"step": ..., "metrics": {...}}``), in order. A
    line torn by a kill mid-write is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [
        row
        for _, row in read_jsonl(path, skip_bad=True)
        if isinstance(row, dict) and "step" in row and "metrics" in row
    ]


def last_metrics(run_dir: Path) -> tuple[dict[str, float], int]:
    """(the latest value of every journalled metric, the last step)."""
    last: dict[str, float] = {}
    step = 0
    for row in read_journal(run_dir):
        last.update(row["metrics"])
        step = max(step, row["step"])
    return last, step


def read_status(run_dir: Path) -> str | None:
    """The training's final status (FINISHED / FAILED / KILLED) kept in the folder, if it ended."""
    try:
        return json.loads((Path(run_dir) / "run_status.json").read_text())["status"]
    except (OSError, ValueError, KeyError):
        return None
