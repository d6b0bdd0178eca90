"""Shared fixtures. One process imports Megatron-Core once (it costs seconds per process), and
one single-rank gloo group serves every model test."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest

# One intra-op thread per process, set before torch is imported here or in any process a test
# starts (they inherit it): the README runs three workers on two cores, each starting trainers,
# Ray trials and torchrun ranks, and torch's default of a thread per core would put more busy
# OpenMP threads on the machine than it has cores (about 20 % more CPU for the same training,
# measured). torchrun and Ray already give their processes one thread. A value the
# caller set is kept.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import torch  # noqa: E402

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=".*full scope is deprecated.*")


@pytest.hookimpl(tryfirst=True)  # before xdist adds each group to the node ids it schedules by
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (the README's ``-n 3 --dist loadgroup``): the tests that share a
    module- or class-scoped fixture (a trained run, a sweep's store, a server) go to one worker,
    which runs them in their order and sets the fixture up once (an ``xdist_group`` named after
    the module, unless the test names one); and the slow tests are handed out first, so that
    the long ones do not end the run on one worker while the other waits. A run without ``-n``
    is left as collected. The grouping needs pytest below 9.2 with pytest-xdist 3.8 (see
    constraints.txt; tests/test_xdist_groups.py checks it). Still, no test may rely on another
    having run before it: ``-k`` or a single file runs it alone."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    for item in items:
        if item.get_closest_marker("xdist_group") is not None:
            continue
        info = getattr(item, "_fixtureinfo", None)
        defs = [d[-1] for d in info.name2fixturedefs.values() if d] if info else []
        if any(d.scope in ("module", "class", "package") for d in defs):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))

    # slow first; a group goes where its slowest test would, its tests in their order (a later
    # test may read what an earlier one left in the shared fixture)
    def group(item):
        mark = item.get_closest_marker("xdist_group")
        return (mark.args[0] if mark.args else mark.kwargs.get("name")) if mark else None

    slow_groups = {group(i) for i in items if i.get_closest_marker("slow") and group(i)}

    def later(item) -> bool:
        g = group(item)
        return g not in slow_groups if g else item.get_closest_marker("slow") is None

    items.sort(key=later)  # stable: the order within each key is kept


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """With ``ALCOT_TEST_CPU=FILE``: each test's CPU seconds (this process and the children it
    reaped: subprocesses, an embedded Ray once shut down), wall seconds, the whole machine's busy
    CPU seconds over the same span (which also counts the other workers' tests), the worker and
    the start time, one JSON line per test in FILE, to find what makes the suite slow. Off by
    default."""
    path = os.environ.get("ALCOT_TEST_CPU")
    if not path:
        return (yield)
    import json
    import resource

    def cpu() -> float:
        a, b = (
            resource.getrusage(resource.RUSAGE_SELF),
            resource.getrusage(resource.RUSAGE_CHILDREN),
        )
        return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime

    def busy() -> float:  # the machine's non-idle CPU seconds since boot (Linux)
        try:
            with open("/proc/stat") as f:
                ticks = [int(x) for x in f.readline().split()[1:]]
        except OSError:
            return 0.0
        return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")

    c0, b0, t0 = cpu(), busy(), time.time()
    try:
        return (yield)
    finally:
        line = {
            "test": item.nodeid,
            "cpu": round(cpu() - c0, 2),
            "wall": round(time.time() - t0, 2),
            "machine_cpu": round(busy() - b0, 2),
            "worker": os.environ.get("PYTEST_XDIST_WORKER", ""),
            "start": round(t0, 2),
        }
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")


@pytest.fixture(scope="session")
def parallel():
    from alcot.model import init_parallel

    init_parallel(1)
    return True


def tiny_config(**overrides):
    """A very small model so that every test runs in well under a second."""
    from alcot.model import ModelConfig

    base = dict(
        size="tiny",
        method="adaptive",
        l_max=3,
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=128,
    )
    base.update(overrides)
    return ModelConfig.from_dict(base)


@pytest.fixture
def build(parallel):
    """build(seed=0, **config overrides) -> AlcotModel."""
    from alcot.model import AlcotModel

    def _build(seed: int = 0, **overrides):
        torch.manual_seed(seed)
        return AlcotModel(tiny_config(**overrides))

    return _build


def spread_router(model, std: float = 0.3, seed: int = 1) -> None:
    """Give the router enough spread that tokens halt at different depths."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.router.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


@contextmanager
def home_at(path, shutdown_ray: bool = False):
    """ALCOT_HOME (tracking store, token cache, runs) set to ``path`` for the duration, then
    restored; ``shutdown_ray`` stops the embedded Ray a sweep started from there."""
    import os

    old = os.environ.get("ALCOT_HOME")
    os.environ["ALCOT_HOME"] = str(path)
    try:
        yield path
    finally:
        if shutdown_ray:
            import ray

            ray.shutdown()
        if old is None:
            os.environ.pop("ALCOT_HOME", None)
        else:
            os.environ["ALCOT_HOME"] = old


@pytest.fixture(scope="session")
def alcot_home(tmp_path_factory):
    """One ALCOT_HOME (tracking store, token cache) for the whole session."""
    with home_at(tmp_path_factory.mktemp("alcot_home")) as home:
        yield home


SMALL_RUN = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.num_attention_heads=4",
    "model.l_max=2",
    "data.seq_len=32",
    "data.builtin_documents=600",
    "data.vocab_size=512",
    "train.batch_size=8",
    "train.steps=20",
    "train.lr=0.01",
    "train.eval_every=10",
    "train.eval_batches=2",
    "train.checkpoint_every=5",
    "train.threads=1",
    "tracking.experiment=tests",
    "tracking.flush_seconds=0.2",
]


def small_run(out_dir, *extra: str):
    """A run config that trains in a couple of seconds on the built-in corpus."""
    from alcot.orchestrator.config import load_run_config

    return load_run_config(None, [*SMALL_RUN, f"out_dir={out_dir}", *extra])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1, stopped and started again by the tests."""

    def __init__(self, root: Path):
        self.root, self.port, self.proc = root, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        self.proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "mlflow"),
                "server",
                "--backend-store-uri",
                f"sqlite:///{self.root / 'server.db'}",
                "--artifacts-destination",
                str(self.root / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
            assert self.proc.poll() is None, "mlflow server died at start"
        raise AssertionError("mlflow server did not become healthy")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None
