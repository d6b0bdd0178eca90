"""Megatron-Core's import on a host without CUDA, without compiling fusions nobody calls.

When ``megatron.core.jit`` is imported, Megatron sets its ``jit_fuser`` decorator to
``torch.compile``, and about a dozen fused functions (bias-GELU, bias-SwiGLU, bias-dropout-add,
cross entropy, ...) are decorated with it as their modules load. Decorating is not free: the first
``torch.compile`` call imports TorchInductor, about 1.2 CPU-seconds in every process that imports
Megatron (each trainer, each Ray trial worker, each tensor or pipeline rank). alcot's model turns
every one of those fusions off (``model/layers.py``: ``bias_activation_fusion``,
``bias_dropout_fusion``, ... are False), so on CPU the compiled versions are never called.

:func:`install` puts an import hook in front of ``megatron.core.jit`` that, right after the module
has run, calls Megatron's own ``disable_jit_fuser()`` when CUDA is not available, so the fused
functions stay plain functions (what Megatron itself does when ``torch.compile`` is missing). With
CUDA available it changes nothing. ``alcot.model`` and ``alcot.data`` install it when they are
imported; installing twice, or after Megatron was imported, does nothing."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

MODULE = "megatron.core.jit"


class _JitOffLoader(importlib.abc.Loader):
    """Runs the real loader, then turns Megatron's jit fuser off on a host without CUDA."""

    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:
        self.inner.exec_module(module)
        import torch  # megatron.core.jit has imported it already

        if not torch.cuda.is_available():
            module.disable_jit_fuser()


class _JitOffFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _JitOffLoader(spec.loader)
        return spec


def install() -> None:
    """Put the hook on ``sys.meta_path`` (once; a no-op once Megatron's jit module is loaded)."""
    if MODULE in sys.modules or any(isinstance(f, _JitOffFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _JitOffFinder())
