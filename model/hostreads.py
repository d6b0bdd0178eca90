"""Counting host reads of tensor values: each one stops a GPU until its queue has drained.

``item()``, ``tolist()``, ``bool(t)``, ``float(t)``, ``int(t)``, ``nonzero()``, ``cpu()`` and
``numpy()`` need a tensor's *values* on the host; on a GPU every call waits for all the work
queued before it. On the CPU they cost nothing, which is why they creep in unnoticed; counted
here they can be pinned by tests (tests/test_host_reads.py) and reported by benchmarks
(bench/generate_speed.py ``host_reads_per_token``).

The counter is a ``TorchFunctionMode``: it sees every such call on any tensor, whatever the
device, so the counts measured on the CPU are the synchronisations the same code makes on a GPU.
``nonzero_static`` (a size given in advance) and shape queries (``numel``, ``shape``) read no
values and are not counted.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode

READS = {
    torch.Tensor.item: "item",
    torch.Tensor.tolist: "tolist",
    torch.Tensor.__bool__: "bool",
    torch.Tensor.__float__: "float",
    torch.Tensor.__int__: "int",
    torch.Tensor.__index__: "index",
    torch.Tensor.__format__: "format",
    torch.Tensor.nonzero: "nonzero",
    torch.nonzero: "nonzero",
    torch.Tensor.cpu: "cpu",
    torch.Tensor.numpy: "numpy",
    torch.Tensor.equal: "equal",
    torch.equal: "equal",
}


class HostReads(TorchFunctionMode):
    """Counts host reads while active: ``total`` and ``by_kind`` (``item``, ``bool``, ...)."""

    def __init__(self, where: bool = False, host_code: tuple[str, ...] = ()):
        super().__init__()
        self.by_kind: Counter = Counter()
        self.where = where  # also count by call site (slower): ``by_site``
        self.by_site: Counter = Counter()
        # reads made from code whose tensors live on the host on any machine (paths containing
        # one of these fragments): not stalls, counted in ``skipped`` only
        self.host_code = host_code
        self.skipped = 0

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    def reset(self) -> None:
        self.by_kind.clear()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kind = READS.get(func)
        if kind is not None:
            if self.host_code and _called_from(self.host_code):
                self.skipped += 1
            else:
                self.by_kind[kind] += 1
                if self.where:
                    self.by_site[(kind, _call_site())] += 1
        return func(*args, **(kwargs or {}))


def _called_from(fragments: tuple[str, ...]) -> bool:
    import traceback

    return any(f in frame.filename for frame in traceback.extract_stack() for f in fragments)


# Host-resident tensors of a training step on any machine: torch's optimizers keep their step
# counters on the CPU (unless fused or capturable) and read them there; the data loader's order
# is a CPU permutation. Their reads do not wait for the GPU.
TRAINER_HOST_CODE = ("/torch/optim/", "/data/loader.py")


def _call_site() -> str:
    """file:line of the innermost caller outside torch."""
    import traceback

    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/torch/" not in frame.filename and not frame.filename.endswith("hostreads.py"):
            return f"{frame.filename}:{frame.lineno}"
    return "?"


@contextmanager
def count_host_reads(where: bool = False, host_code: tuple[str, ...] = ()):
    """``with count_host_reads() as reads: ...`` then ``reads.total`` (``where``: also
    ``reads.by_site``, counts per (kind, file:line); ``host_code``: see :class:`HostReads`)."""
    mode = HostReads(where, host_code)
    with mode:
        yield mode
