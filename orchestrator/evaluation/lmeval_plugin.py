"""Make ``lm_eval --model alcot`` work from the harness's own command line.

lm-eval 0.4 finds models only in its registry and loads no plugins, so a model defined outside
it is unknown to ``lm_eval`` unless its module was imported first. ``scripts/install.sh`` puts
a one-line ``alcot-lm-eval.pth`` into the environment that calls :func:`install`: it adds an
import hook that, once ``lm_eval.api.registry`` has been loaded (by lm-eval itself, in any
process), makes its ``get_model`` know ``alcot`` as a lazy entry
(``alcot.orchestrator.evaluation.lmeval_model:AlcotHarnessLM``) beside the built-in models.
Nothing else is imported at interpreter start, and any failure here is silent: it must never
break Python start-up.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import sys

TARGET = "lm_eval.api.registry"
ENTRY = "alcot.orchestrator.evaluation.lmeval_model:AlcotHarnessLM"


def _register(module) -> None:
    """Register ``alcot`` lazily. lm-eval fills its registry with the built-in models only
    when it is empty at the first ``get_model``; so the built-ins are loaded first there."""
    registry = getattr(module, "model_registry", None)
    original = getattr(module, "get_model", None)
    if registry is None or original is None or getattr(original, "_alcot", False):
        return

    def get_model(model_name: str):
        import lm_eval.models  # noqa: F401 - registers the built-in models (lazily)

        if "alcot" not in registry:
            registry.register("alcot", target=ENTRY)
        return original(model_name)

    get_model._alcot = True
    get_model.__doc__ = original.__doc__
    module.get_model = get_model


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                loader = spec.loader
                original = loader.exec_module

                def exec_module(module, _original=original):
                    _original(module)
                    with contextlib.suppress(Exception):  # never break lm-eval's import
                        _register(module)

                loader.exec_module = exec_module
                return spec
        return None


def install() -> None:
    try:
        if TARGET in sys.modules:
            _register(sys.modules[TARGET])
        elif not any(isinstance(f, _Finder) for f in sys.meta_path):
            sys.meta_path.insert(0, _Finder())
    except Exception:  # noqa: BLE001 - see the module docstring
        pass
