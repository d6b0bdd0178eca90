"""Megatron-Core imported on a host without CUDA leaves its fused functions uncompiled (alcot
turns those fusions off, and decorating them with ``torch.compile`` costs every process that
imports Megatron about a second of CPU); with CUDA it is left as Megatron sets it."""

import subprocess
import sys

PROBE = """
import sys, torch
{before}
import alcot.model, megatron.core
import megatron.core.jit as jit
from megatron.core.fusions import fused_bias_swiglu
print(jit.jit_fuser is jit.noop_decorator, jit.jit_fuser is torch.compile,
      'torch._inductor.compile_fx' in sys.modules, callable(fused_bias_swiglu.swiglu))
"""


def probe(before: str = "") -> list[str]:
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", PROBE.format(before=before)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split()


def test_without_cuda_megatrons_fusions_are_plain_functions():
    assert probe("assert not torch.cuda.is_available()") == ["True", "False", "False", "True"]


def test_with_cuda_megatron_keeps_torch_compile():
    assert probe("torch.cuda.is_available = lambda: True") == ["False", "True", "True", "True"]


def test_installing_after_megatron_was_imported_changes_nothing(monkeypatch):
    """(In this process: a hook installed now would come too late, so none is added.)"""
    import types

    from alcot.common import megatron_cpu

    monkeypatch.setitem(sys.modules, megatron_cpu.MODULE, types.ModuleType(megatron_cpu.MODULE))
    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path if not _is_hook(f)])
    megatron_cpu.install()
    assert not any(_is_hook(f) for f in sys.meta_path)


def test_installing_twice_adds_one_hook(monkeypatch):
    from alcot.common import megatron_cpu

    monkeypatch.delitem(sys.modules, megatron_cpu.MODULE, raising=False)
    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path if not _is_hook(f)])
    megatron_cpu.install()
    megatron_cpu.install()
    assert sum(_is_hook(f) for f in sys.meta_path) == 1


def _is_hook(finder) -> bool:
    from alcot.common import megatron_cpu

    return isinstance(finder, megatron_cpu._JitOffFinder)
