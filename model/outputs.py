"""What a forward of the model hands back and what moves between its passes: ``ModelOutput``
(loss, logits, depth, FLOPs), ``LatentTrace``, and a pass's ``PassRequest`` / ``Micro`` (the rows
a latent pass runs; pipeline stages send them to each other). Kept apart from ``network.py`` so
that ``pipeline.py`` uses them without importing the model."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .halting import StepRecord
from .layers import LatentKV


@dataclass
class ModelOutput:
    loss: Tensor | None  # ce_loss + lambda * adapt_loss (None without labels)
    ce_loss: Tensor | None
    adapt_loss: Tensor | None
    logits: Tensor | None  # [b, s, V]: logits (state mixing) or log-probs (distribution mixing)
    depth: Tensor  # [b, s] executed latent steps K_t (0 for vanilla)
    flops: dict[str, float] = field(default_factory=dict)

    @property
    def mean_depth(self) -> float:
        return float(self.depth.float().mean())


@dataclass
class LatentTrace:
    """What a latent forward leaves behind: per step, which tokens ran it ([b, s] bool), and
    (if asked for) every step's hidden states [s, b, h]. The KV caches stay in ``model.state``
    for decoding to continue from."""

    ran: list[Tensor]
    hidden: list[Tensor] = field(default_factory=list)
    records: list[StepRecord] = field(default_factory=list)  # adaptive / fixed: per-step halting


@dataclass
class PassRequest:
    """One traversal of the stack that a method's program asks for.

    ``kind``: ``packed`` (a latent step over the tokens at (``rows``, ``pos``), row after row),
    ``causal`` (every token, causal attention) or ``pause`` (every token followed by its pause
    tokens). ``feed`` is what the first stage builds the input from (None at step 0, where the
    input is the embedding): the previous step's states for the latent methods and looped,
    the next-token distribution for PonderLM."""

    step: int
    kind: str
    rows: Tensor | None = None
    pos: Tensor | None = None
    feed: Tensor | None = None
    width: int = 0  # packed: the most tokens one row runs (known on the host)


@dataclass
class Micro:
    """One micro-batch's forward on one stage (see :meth:`AlcotModel.micro`)."""

    b: int
    s: int
    device: torch.device
    rope: Tensor
    ids: Tensor
    kv: LatentKV | None = None
    emb: Tensor | None = None  # first stage: s * E[x], [s, b, h]
    u: Tensor | None = None  # first stage, PonderLM: the input of the latest pass
