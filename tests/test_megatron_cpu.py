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


def test_installing_after_megatron_was_imported_changes_nothing():
    before = "import megatron.core.jit"
    assert probe(before) == ["False", "True", "True", "True"]
