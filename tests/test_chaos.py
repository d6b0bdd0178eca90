"""The chaos soak's two-minute version with a fixed seed (bench/chaos.py): sweeps on the
embedded Ray against a real MLflow server on PostgreSQL while worker and driver kills, server
restarts, frozen trainers, torn journals and corrupt checkpoints are injected. Every trial must
finish with nothing lost, duplicated, unloadable or trained twice."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from services import postgres_bin, require

ROOT = Path(__file__).resolve().parents[1]
ZERO = (
    "duplicate_runs",
    "missing_points",
    "duplicate_points",
    "unloadable_checkpoints",
    "trained_twice",
)


@pytest.mark.slow
def test_two_minute_chaos_soak_loses_nothing():
    require("PostgreSQL", postgres_bin() is not None, "apt-get install -y postgresql")
    res = subprocess.run(
        [sys.executable, "bench/chaos.py", "--seed", "0", "--minutes", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    lines = res.stdout.strip().splitlines()
    assert lines, res.stderr[-5000:]
    line = json.loads(lines[-1])
    print(lines[-2] if len(lines) > 1 else "", lines[-1])
    assert set(line) == {"faults", "trials", *ZERO, "finished", "wall_s"}
    assert line["trials"] >= 12
    assert sum(line["faults"].values()) >= 3, line  # faults were injected, of several kinds
    assert sum(1 for n in line["faults"].values() if n) >= 3, line
    assert line["finished"] == line["trials"], (line, res.stderr[-5000:])
    assert {k: line[k] for k in ZERO} == dict.fromkeys(ZERO, 0), (line, res.stderr[-5000:])
    assert res.returncode == 0, res.stderr[-5000:]
