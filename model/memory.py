"""Activation memory as autograd sees it: the bytes a forward saves for its backward.

Counted with ``torch.autograd.graph.saved_tensors_hooks``: each saved tensor's storage once, at
its full size (views of one buffer, like the latent caches' per-step prefixes or the attention
mask every layer shares, count once), parameters excluded. Deterministic on CPU, so tests and
``bench/model_memory.py`` can compare methods and settings exactly.
"""

from __future__ import annotations

import torch


def saved_bytes(model, x, y) -> int:
    """Bytes of distinct storages saved for backward by one training forward of ``model`` on
    ``(x, y)``; runs the backward too (so the graph is released) and clears the gradients."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in params:
            storages[ptr] = max(storages.get(ptr, 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x, y)
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())
