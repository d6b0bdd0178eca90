"""The installed console command, and lint/format as part of the test run."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(*args, timeout=120):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_alcot_help_and_version():
    res = run(str(BIN / "alcot"), "--help")
    assert res.returncode == 0, res.stderr
    assert "version" in res.stdout and "smoke" in res.stdout
    res = run(str(BIN / "alcot"), "version")
    assert res.returncode == 0 and res.stdout.startswith("alcot "), res.stdout


def test_alcot_without_a_command_shows_help_and_fails():
    res = run(str(BIN / "alcot"))
    assert res.returncode == 2 and "usage" in res.stdout


def test_alcot_smoke_trains():
    res = run(str(BIN / "alcot"), "smoke", "--steps", "30", timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "cross-entropy" in res.stdout


def test_ruff_lint_and_format():
    res = run(str(BIN / "ruff"), "check", ".")
    assert res.returncode == 0, res.stdout
    res = run(str(BIN / "ruff"), "format", "--check", ".")
    assert res.returncode == 0, res.stdout
