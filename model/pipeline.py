"""Pipeline parallelism for latent recurrence: the wavefront schedule on Megatron's p2p ops.

A latent model traverses the stages ``1 + K`` times per micro-batch, with ``K`` data-dependent
and a back-edge from the last stage (which owns the head, the router and the halting decision)
to the first (which owns the embeddings). Megatron-Core's schedules
(``get_forward_backward_func``: no pipelining, 1F1B, interleaved 1F1B) treat one micro-batch's
forward as one traversal and have no back-edge, so they cannot run it. This module runs it on
Megatron's point-to-point primitive (``p2p_communication._p2p_ops``: isend/irecv between
neighbours of ``parallel_state``'s pipeline ring, whose ``next`` of the last stage is the first
stage: the back-edge is an ordinary ring edge).

**Schedule** (docs/architecture.md has the timeline figure). Every stage runs the slots
``(i, k)`` (micro-batch i, latent step k) in the order ``for k in 0..l_max: for i in 0..M-1``:
while stage 1 runs step k of micro-batch i, stage 0 runs step k of micro-batch i + 1, and by
the time stage 0 has run step k of every micro-batch, the last stage has sent back step k + 1's
inputs of the first ones (no stall when M >= P and the steps cost alike). All forwards first,
then all backwards in the reverse order (GPipe-style, per latent step): the autograd graph of
each (micro-batch, step, stage) is kept and gradients travel back along the same edges. The
idle share of a stage is (P - 1) slots of fill/drain per direction out of S M + P - 1, with
S = 1 + l_max traversals per micro-batch (:func:`bubble_fraction`): the recurrence makes the
pipeline S times deeper, so the bubble is S times smaller than GPipe's for the same M.

**Halting.** The set of tokens of a step is decided on the last stage; it travels with the
activations as (row, position) indices, so every stage plans the same cache slots and mask for
its own layers' caches (``LatentKV``, one per micro-batch and stage). A micro-batch whose tokens
have all halted sends an empty message through the ring, so every stage keeps the same static
slot order (which is what makes the ordering of messages on each channel agree).

**Gradients.** Each slot keeps (input leaf, output). The last stage's *program* (the method's
router, halting, mixing and loss, ``network.py``) reads detached copies of the slot outputs;
its backward runs once for the loss and once per back-edge tensor it sent, with
``retain_graph`` (autograd accumulates linearly, so a tensor's gradient is complete once every
consumer has run). A slot's stack backward runs once, after its output gradient is complete:
from the next stage, or (last stage) from the program's loss and the gradient that the first
stage returns for the next step's input. Steps run backward from the last to the first on each
stage, which the latent caches' per-slot key/value gradients need.

Why not Megatron's ``P2PCommunicator``: its send/recv calls wait on every send (the shape
exchange of ``variable_seq_lengths`` always does), and a gloo send completes only when the peer
receives; in this ring the last stage sends back-edge inputs while the first stage is still
sending forward, so blocking sends deadlock. Sends here are non-blocking (waited at the end of
each phase), receives block. Megatron's communicator also carries one float dtype and 3-D
shapes; the (row, position) indices are integers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from .outputs import ModelOutput, PassRequest

if TYPE_CHECKING:  # annotations only: the model imports this module for its pipeline forward
    from .network import AlcotModel

_KINDS = ("packed", "causal", "pause")


def bubble_fraction(stages: int, microbatches: int, traversals: int) -> float:
    """Idle share of a stage under the wavefront schedule, if every slot costs the same.

    ``traversals`` = S slots per micro-batch (1 + l_max). A stage runs S M slots; the last
    slot of the first micro-batch's step k must be back at the first stage before it starts step
    k + 1, so a step of the wavefront lasts max(M, P) slots. Makespan per direction:
    (S - 1) max(M, P) + M + P - 1 slots; idle share = 1 - S M / makespan (forward and backward
    alike, so also for the whole step). M >= P: (P - 1) / (S M + P - 1)."""
    p, m, s = stages, microbatches, traversals
    span = (s - 1) * max(m, p) + m + p - 1
    return 1.0 - s * m / span


def simulate_bubble(stages: int, costs: list[list[float]], backward: float = 2.0) -> float:
    """Idle share of the stages when the schedule runs slots of the given costs.

    ``costs[i][k]``: the cost of micro-batch i's step k on one stage (e.g. its executed tokens;
    0 for a step it did not run); a backward slot costs ``backward`` times its forward. Every
    slot waits for its input (previous stage, or for step k > 0 at the first stage the last
    stage's step k - 1) and for its stage; backward runs the mirror order with the mirror
    edges, each stage starting once its forwards are done. With equal costs this is
    :func:`bubble_fraction` (forward and backward have the same idle share)."""
    p_n, m = stages, len(costs)
    steps = max(len(c) for c in costs)
    cost = [[c[k] if k < len(c) else 0.0 for k in range(steps)] for c in costs]
    end = {}
    free = [0.0] * p_n
    busy = [0.0] * p_n
    for k in range(steps):
        for i in range(m):
            if cost[i][k] <= 0:
                continue
            for p in range(p_n):
                ready = end[(p - 1, i, k)] if p else (end[(p_n - 1, i, k - 1)] if k else 0.0)
                start = max(free[p], ready)
                end[(p, i, k)] = free[p] = start + cost[i][k]
                busy[p] += cost[i][k]
    bend = {}
    for k in reversed(range(steps)):
        for i in range(m):
            if cost[i][k] <= 0:
                continue
            for p in reversed(range(p_n)):
                if p < p_n - 1:
                    ready = bend[(p + 1, i, k)]
                elif k + 1 < steps and cost[i][k + 1] > 0:
                    ready = bend[(0, i, k + 1)]
                else:
                    ready = 0.0
                start = max(free[p], ready)
                bend[(p, i, k)] = free[p] = start + backward * cost[i][k]
                busy[p] += backward * cost[i][k]
    span = max(free)
    return 1.0 - sum(busy) / (p_n * span)


@dataclass
class _Slot:
    req: PassRequest | None = None  # None: the micro-batch had halted (empty slot)
    x_in: Tensor | None = None  # first stage: the input as built (in the embedding's graph)
    x: Tensor | None = None  # the stack's input leaf on this stage
    feed: Tensor | None = None  # first stage: the received feed leaf
    y: Tensor | None = None  # the stack's output
    d: Tensor | None = None  # last stage: detached output the program reads
    sent: Tensor | None = None  # last stage: the next step's feed, sent to the first stage


@dataclass
class Timeline:
    """Compute intervals per stage: (kind, micro-batch, step, start, end); kind 'F' the stack's
    forward, 'P' the last stage's program after a traversal (router, halting, mixing, and the
    head and loss after the last one), 'L' the loss backward, 'B' a slot's backward."""

    events: list[tuple[str, int, int, float, float]] = field(default_factory=list)

    def add(self, kind: str, i: int, k: int, t0: float) -> None:
        self.events.append((kind, i, k, t0, time.perf_counter()))


def comm_device(model: AlcotModel) -> torch.device:
    """The device of every tensor the pipeline hands to torch.distributed: the model's (NCCL
    refuses CPU tensors; gloo takes the CPU tensors of a CPU model)."""
    return model.device


class _Ring:
    """Non-blocking sends and blocking receives between pipeline neighbours, through Megatron's
    ``_p2p_ops`` (which picks the groups so that the two directions of a pair overlap). Every
    tensor sent, every receive buffer and every header lives on ``device``."""

    def __init__(self, device: torch.device):
        from megatron.core import parallel_state as ps

        self.device = device
        self.group = ps.get_pipeline_model_parallel_group()
        self.next = ps.get_pipeline_model_parallel_next_rank()
        self.prev = ps.get_pipeline_model_parallel_prev_rank()
        self.pending: list = []

    def _ops(self, **kw):
        from megatron.core.pipeline_parallel.p2p_communication import _p2p_ops

        args = dict(
            tensor_send_prev=None, tensor_recv_prev=None, tensor_send_next=None,
            tensor_recv_next=None,
        )  # fmt: skip
        args.update(kw)
        return _p2p_ops(
            **args,
            group=self.group,
            prev_pipeline_rank=self.prev,
            next_pipeline_rank=self.next,
        )

    def send(self, t: Tensor, to_next: bool) -> None:
        t = t.detach().to(self.device).contiguous()
        reqs = self._ops(**{"tensor_send_next" if to_next else "tensor_send_prev": t})
        self.pending.append((list(reqs.values()), t))

    def recv(self, shape, dtype, from_prev: bool) -> Tensor:
        buf = torch.empty(shape, dtype=dtype, device=self.device)
        reqs = self._ops(**{"tensor_recv_prev" if from_prev else "tensor_recv_next": buf})
        for r in reqs.values():
            r.wait()
        return buf

    def flush(self) -> None:
        for reqs, _ in self.pending:
            for r in reqs:
                r.wait()
        self.pending.clear()

    def _header(self, values: list[int]) -> Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    # a request and its payload: header [6] = (N, kind, width, d0, d1, d2) with N = -1 for an
    # empty slot, N = 0 for a full pass; then (row, position) indices [2, N] and the payload
    def send_request(self, req: PassRequest | None, payload: Tensor | None, to_next: bool):
        if req is None:
            self.send(self._header([-1, _KINDS.index("packed"), 0, 0, 0, 0]), to_next)
            return
        n = 0 if req.rows is None else req.rows.numel()
        shape = list(payload.shape) if payload is not None else [0, 0, 0]
        self.send(self._header([n, _KINDS.index(req.kind), req.width, *shape]), to_next)
        if n:
            self.send(torch.stack([req.rows, req.pos]), to_next)
        if payload is not None:
            self.send(payload, to_next)

    def recv_request(self, step: int, dtype, from_prev: bool, grad: bool):
        head = self.recv((6,), torch.long, from_prev).tolist()  # the shapes: read on the host
        n, kind, width, shape = head[0], _KINDS[head[1]], head[2], head[3:]
        if n < 0:
            return None
        rows = pos = None
        if n:
            rows, pos = self.recv((2, n), torch.long, from_prev)
        feed = None
        if shape[0]:
            feed = self.recv(shape, dtype, from_prev).requires_grad_(grad)
        return PassRequest(step, kind, rows, pos, feed, width)


def run_pipeline(
    model: AlcotModel,
    batches: list[tuple[Tensor, Tensor | None, Tensor | None]],
    backward: bool = True,
    loss_scale: float = 1.0,
    return_logits: bool = False,
    timeline: Timeline | None = None,
) -> list[ModelOutput] | None:
    """Forward (and backward) of micro-batches ``(ids, labels, loss_mask)`` through the stages.

    Every stage of the pipeline calls it with the same batches. Returns the outputs on the last
    stage (None elsewhere); ``backward`` accumulates ``loss_scale * loss`` gradients of every
    micro-batch into the parameters of every stage."""
    outs, _ = _schedule(model, batches, backward, loss_scale, return_logits, timeline)
    return outs


def _schedule(model, batches, backward, loss_scale, return_logits, timeline, keep_states=False):
    if model.pp < 2:
        raise ValueError("run_pipeline needs model.pipeline_parallel_size >= 2")
    first, last = model.first, model.last
    ring = _Ring(comm_device(model))
    steps = model.cfg.l_max + 1
    grad = backward and torch.is_grad_enabled()
    dtype = model.compute_dtype
    m = len(batches)
    programs = [None] * m
    outs: list[ModelOutput | None] = [None] * m
    traces = [None] * m
    slots = [[_Slot() for _ in range(steps)] for _ in range(m)]

    def clock():
        return time.perf_counter()

    with torch.set_grad_enabled(grad):
        micros = [model.micro(ids) for ids, _, _ in batches]
        if last:
            for i, (_, labels, mask) in enumerate(batches):
                programs[i] = model.program(micros[i], labels, mask, return_logits, keep_states)
                next(programs[i])  # its step-0 request is first_request's
        for k in range(steps):
            for i in range(m):
                slot, mb = slots[i][k], micros[i]
                if first:
                    if k == 0:
                        req = model.first_request(mb)
                    else:
                        req = ring.recv_request(k, dtype, from_prev=True, grad=grad)
                    if req is None:
                        ring.send_request(None, None, to_next=True)
                        continue
                    t0 = clock()
                    slot.feed = req.feed
                    slot.x_in = model.stage_input(mb, req)
                    if slot.x_in is req.feed or not slot.x_in.requires_grad:
                        slot.x = slot.x_in
                    else:
                        slot.x = slot.x_in.detach().requires_grad_()
                else:
                    req = ring.recv_request(k, dtype, from_prev=True, grad=grad)
                    if req is None:  # halted: the empty slot goes round the ring
                        if not last or k + 1 < steps:
                            ring.send_request(None, None, to_next=True)
                        continue
                    t0 = clock()
                    slot.x = req.feed
                slot.req = req
                y, plan = model.stage_pass(mb, req, slot.x)
                slot.y = y
                if not last:
                    if timeline is not None:
                        timeline.add("F", i, k, t0)
                    fwd = PassRequest(k, req.kind, req.rows, req.pos, width=req.width)
                    ring.send_request(fwd, y, True)
                    continue
                if timeline is not None:
                    timeline.add("F", i, k, t0)
                    t0 = clock()
                slot.d = y.detach().requires_grad_(grad)
                try:
                    nxt = programs[i].send((slot.d, plan))
                except StopIteration as stop:
                    outs[i], traces[i] = stop.value
                    nxt = None
                if timeline is not None:  # the program: router, halting, mixing, head, loss
                    timeline.add("P", i, k, t0)
                if k + 1 < steps:
                    ring.send_request(nxt, None if nxt is None else nxt.feed, to_next=True)
                    slot.sent = None if nxt is None else nxt.feed
                elif nxt is not None:
                    raise RuntimeError("a program asked for more than 1 + l_max traversals")
        ring.flush()

        if grad:
            if last:
                for i, out in enumerate(outs):
                    t0 = clock()
                    torch.autograd.backward(out.loss * loss_scale, retain_graph=True)
                    if timeline is not None:
                        timeline.add("L", i, steps, t0)
            for k in reversed(range(steps)):
                for i in range(m):
                    slot = slots[i][k]
                    if slot.req is None:
                        continue
                    if last:
                        if slot.sent is not None:
                            g = ring.recv(slot.sent.shape, slot.sent.dtype, from_prev=False)
                            t0 = clock()
                            torch.autograd.backward(slot.sent, g, retain_graph=True)
                        else:
                            t0 = clock()
                        gy = slot.d.grad if slot.d.grad is not None else torch.zeros_like(slot.y)
                    else:
                        gy = ring.recv(slot.y.shape, slot.y.dtype, from_prev=False)
                        t0 = clock()
                    torch.autograd.backward(slot.y, gy)
                    gx = slot.x.grad
                    if first:
                        if slot.x is not slot.x_in:
                            torch.autograd.backward(slot.x_in, gx, retain_graph=True)
                        if timeline is not None:
                            timeline.add("B", i, k, t0)
                        if slot.feed is not None:
                            f = slot.feed
                            ring.send(f.grad if f.grad is not None else torch.zeros_like(f), False)
                    else:
                        if timeline is not None:
                            timeline.add("B", i, k, t0)
                        ring.send(gx if gx is not None else torch.zeros_like(slot.x), False)
                    slots[i][k] = _Slot(req=slot.req)  # free the graph of this slot
            ring.flush()
    for mb in micros:
        mb.kv = None
    return (outs, traces) if last else (None, None)


def broadcast_outputs(model: AlcotModel, outs: list[ModelOutput] | None, m: int):
    """Every stage gets the last stage's outputs (detached; logits included when present)."""
    from megatron.core import parallel_state as ps

    src = ps.get_pipeline_model_parallel_last_rank()
    box = [None]
    if model.last:
        box = [
            [
                ModelOutput(
                    *(
                        None if t is None else t.detach()
                        for t in (o.loss, o.ce_loss, o.adapt_loss, o.logits)
                    ),
                    o.depth,
                    o.flops.resolved(),
                )
                for o in outs
            ]
        ]
    dist.broadcast_object_list(box, src=src, group=ps.get_pipeline_model_parallel_group())
    if len(box[0]) != m:
        raise RuntimeError("pipeline stages disagree on the number of micro-batches")
    return box[0]


@torch.no_grad()
def step0_loss_and_depth(model: AlcotModel, input_ids: Tensor, labels: Tensor):
    """(step-0 cross-entropy [b, s], executed depth [b, s]) of a latent forward, on every stage
    (the per-token diagnostics of ``diagnostics.py``)."""
    from megatron.core import parallel_state as ps

    outs, traces = _schedule(model, [(input_ids, labels, None)], False, 1.0, False, None, True)
    box = [None]
    if model.last:
        ce0 = model._ce(model._logits(traces[0].hidden[0]), labels.t()).t()
        box = [(ce0.float().cpu(), outs[0].depth.cpu())]
    src = ps.get_pipeline_model_parallel_last_rank()
    dist.broadcast_object_list(box, src=src, group=ps.get_pipeline_model_parallel_group())
    return box[0]


def forward_only(model, input_ids, labels=None, loss_mask=None, return_logits=False):
    """One micro-batch through the stages without a backward; every stage gets the output."""
    outs = run_pipeline(model, [(input_ids, labels, loss_mask)], False, 1.0, return_logits)
    return broadcast_outputs(model, outs, 1)[0]
