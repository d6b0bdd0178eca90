"""Run Megatron-Core on a CPU-only torch build.

Megatron-Core has no CPU path: it assumes CUDA in a handful of places that our model reaches.
Rather than edit the library, :func:`ensure_cpu_compat` installs a few runtime patches, and only
when ``torch.cuda.is_available()`` is false. With CUDA present it does nothing at all, so the same
model code runs unchanged on GPU nodes.

The patches (see ``shared/STACK_NOTES.md`` for how each assumption was found):

1. ``torch.cuda.current_device()`` is used as an allocation device in ~40 places (rotary
   ``inv_freq``, tensor-parallel all-gathers, layer buffers). On CPU it returns the CPU device.
2. ``torch.cuda.synchronize()`` is called by ``parallel_state`` and p2p code: a no-op on CPU.
3. Megatron's RNG tracker forks the CUDA generator. On CPU, ``fork()`` forks the CPU generator
   instead so code paths that enter the tracker (sequence parallel, recompute) keep working.
4. ``get_default_causal_mask`` / ``get_sliding_window_causal_mask`` build masks on ``"cuda"``;
   on CPU they are rebuilt on the CPU. (Our own core attention always receives explicit masks,
   but a stock Megatron attention module in a test or a future spec must not crash.)

What is *not* patched, because this project does not use it on CPU: Megatron's pipeline
schedules (pipeline parallelism runs its own schedule on Megatron's p2p ops, ``pipeline.py``),
its optimizer and grad clipping, and the distributed optimizer (whose checkpoints are
broken without apex/TE in 0.16.1). The trainer uses torch's AdamW and clipping instead.
"""

from __future__ import annotations

import contextlib

import torch

_APPLIED = False


def ensure_cpu_compat() -> bool:
    """Install the CPU patches once per process. Returns True if patches are active."""
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True

    cpu = torch.device("cpu")
    torch.cuda.current_device = lambda: cpu  # patch 1
    torch.cuda.synchronize = lambda *args, **kwargs: None  # patch 2

    from megatron.core.tensor_parallel import random as mrandom

    class _CPURNGTracker(mrandom.CudaRNGStatesTracker):  # patch 3
        """Keeps named CPU generator states and forks them like the CUDA tracker does."""

        def add(self, name, seed):
            if name in self.states_:
                raise Exception(f"cuda rng state {name} already exists")
            self.seeds_.add(seed)
            gen = torch.Generator()
            gen.manual_seed(seed)
            self.states_[name] = gen.get_state()

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"cuda rng state {name} is not added")
            saved = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(saved)

    mrandom._CUDA_RNG_STATE_TRACKER = _CPURNGTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    from megatron.core.fusions import fused_softmax  # patch 4
    from megatron.core.transformer import utils as tutils

    def _causal(sq):
        return torch.ones(sq, sq, dtype=torch.bool).triu(diagonal=1)

    def _sliding(sq, skv, window_size):
        m = torch.ones(sq, skv, dtype=torch.bool)
        upper = torch.triu(m, diagonal=skv - sq - window_size[0])
        return ~torch.tril(upper, diagonal=skv - sq + window_size[1])

    for mod in (tutils, fused_softmax):  # fused_softmax imported both by name
        mod.get_default_causal_mask = _causal
        mod.get_sliding_window_causal_mask = _sliding

    _APPLIED = True
    return True
