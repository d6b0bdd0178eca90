"""The README's test command relies on ``--dist loadgroup`` keeping the tests that share an
expensive module-scoped fixture (a trained sweep, a server) on one worker, which then sets the
fixture up once. pytest 9.2 made that grouping a silent no-op under pytest-xdist 3.8 (each test
went to any worker and the fixture was built on both); this runs a small suite the way the
README does, with this suite's conftest, and checks that a group stays on one worker."""

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent

SUITE = """
import os
import pytest

@pytest.fixture(scope="module")
def built():
    with open(os.environ["BUILT_LOG"], "a") as f:
        f.write(os.environ.get("PYTEST_XDIST_WORKER", "-") + "\\n")
    return 1

@pytest.mark.parametrize("i", range(6))
def test_shares_the_fixture(built, i):
    pass

@pytest.mark.parametrize("i", range(6))
def test_needs_nothing(i):
    pass
"""


def test_tests_sharing_a_module_fixture_run_on_one_worker_which_builds_it_once(tmp_path):
    (tmp_path / "tests").mkdir()
    shutil.copy(HERE / "conftest.py", tmp_path / "tests" / "conftest.py")
    shutil.copy(HERE / "services.py", tmp_path / "tests" / "services.py")
    (tmp_path / "tests" / "test_grouped.py").write_text(textwrap.dedent(SUITE))
    log = tmp_path / "built.log"
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-v", "-p",
         "no:cacheprovider", "tests/test_grouped.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "BUILT_LOG": str(log)},
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ran = re.findall(r"\[(gw\d)\] .*PASSED .*::(test_\w+)\[(\d)\](@\S+)?", res.stdout)
    assert len(ran) == 12, res.stdout[-3000:]
    shared = {(worker, group) for worker, name, _, group in ran if name.endswith("fixture")}
    assert len(shared) == 1, shared  # one worker, one group (the module's)
    assert shared.pop()[1] == "@test_grouped"
    assert log.read_text().split() in (["gw0"], ["gw1"])  # the fixture was built once
    assert all(not group for _, name, _, group in ran if name == "test_needs_nothing")
