"""Router, reach/exit weights and the adaptive losses (METHOD.md, "Router and halting").

Notation, per token t and latent step k:

* ``g(k) = sigmoid(router(h(k)))``: probability of continuing after step k (k < l_max)
* reach ``r(0) = 1``, ``r(k+1) = r(k) g(k)``; exit ``e(k) = r(k) (1 - g(k))``
* the token runs step k+1 iff ``r(k+1) >= tau`` (and it ran step k): ``K_t`` is its last step
* weights ``w(k) = e(k)`` for k < K_t and ``w(K_t) = r(K_t)``, so they sum to 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .config import ModelConfig


class Router(nn.Module):
    """Continuation probability from a post-norm hidden state.

    ``linear`` (default): one d -> 1 layer shared by all steps; ``per_step``: one per step;
    ``mlp``: d -> d -> 1 with SiLU. The bias starts at ``logit(init_continue)`` (0.5 by default,
    half of every token's weight on step 0; see docs/study/router.md for why not METHOD.md's
    0.9).
    ``router_init: normal`` draws the output weights with std ``init_std``, so the first g spread
    around that value (for 0.9: about 0.82 to 0.94 at d = 512, wider at d = 2048, since w . h
    has std init_std * sqrt(d) for post-norm h); ``zero`` starts every token exactly at it (the bias
    alone; the weights still get gradients, since h is not zero). ``detach_router_input`` feeds
    the router sg(h): then the adaptive loss trains the router only, never the backbone.
    The router is small and replicated on every tensor-parallel rank.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, kind = cfg.hidden_size, cfg.halting.router
        self.kind = kind
        self.detach = cfg.halting.detach_router_input
        bias0 = math.log(cfg.halting.init_continue / (1.0 - cfg.halting.init_continue))
        if kind == "mlp":
            self.net = nn.Sequential(nn.Linear(h, h), nn.SiLU(), nn.Linear(h, 1))
            nn.init.normal_(self.net[0].weight, std=cfg.init_std)
            nn.init.zeros_(self.net[0].bias)
            last = self.net[2]
        else:
            n = cfg.l_max if kind == "per_step" else 1
            self.steps = nn.ModuleList(nn.Linear(h, 1) for _ in range(n))
            last = None
        for lin in [last] if last is not None else list(self.steps):
            if cfg.halting.router_init == "zero":
                nn.init.zeros_(lin.weight)
            else:
                nn.init.normal_(lin.weight, std=cfg.init_std)
            nn.init.constant_(lin.bias, bias0)

    def forward(self, hidden: Tensor, step: int) -> Tensor:
        """``hidden`` [..., h] -> g [...] in (0, 1), computed in fp32 even under autocast."""
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            x = (hidden.detach() if self.detach else hidden).float()
            if self.kind == "mlp":
                logit = self.net(x)
            else:
                logit = self.steps[step if self.kind == "per_step" else 0](x)
        return torch.sigmoid(logit.squeeze(-1))


@dataclass
class StepRecord:
    """Per-step halting quantities in [b, s] layout (zero where the token did not run)."""

    weight: Tensor  # w(k)
    ran: Tensor  # bool: token executed step k
    cont: Tensor  # bool: token continued to step k+1 (k < K_t)
    gate: Tensor | None  # g(k) where computed
    reach_next: Tensor | None  # r(k+1)
    q: Tensor | None  # sg(softmax(W h(k))[y]) where computed
    ce: Tensor | None  # -log softmax(W h(k))[y] with grad (distribution mixing)


def halting_update(
    r: Tensor, active: Tensor, g: Tensor | None, last: bool, tau: float
) -> tuple[Tensor, Tensor, Tensor]:
    """One step of the reach recursion.

    Returns ``(weight, cont, r_next)``: the exit weight of this step (the whole remaining reach
    for a token that stops here), which tokens continue, and the next reach.
    """
    zero = torch.zeros_like(r)
    if last:
        return torch.where(active, r, zero), torch.zeros_like(active), r
    if g is None:  # router off: everyone continues, all the weight goes to the last step
        return zero, active, r
    r_next = r * g
    cont = active & (r_next >= tau)
    weight = torch.where(cont, r * (1.0 - g), torch.where(active, r, zero))
    return weight, cont, torch.where(cont, r_next, r)


def adaptive_loss(records: list[StepRecord], cfg: ModelConfig, token_mask: Tensor) -> Tensor:
    """The adaptive loss averaged over tokens (``token_mask`` [b, s] float).

    * ``gate`` (default): sum_{k<K_t} sg(q_t(k)[y_t])^beta * g_t(k)
    * ``reach``: the same with r_t(k+1) in place of g_t(k)
    * ``act``: expected extra steps, sum_{k=1..K_t} r_t(k) (an ACT-style ponder cost)
    * ``pondernet``: KL(w_t || geometric(prior) truncated to the executed steps)
    """
    hc = cfg.halting
    total = torch.zeros_like(token_mask)
    if hc.loss == "pondernet":
        p = hc.prior
        for k, rec in enumerate(records):  # a record exists only for a step some token ran
            # prior mass of step k: p (1-p)^k, the last executed step takes the tail (1-p)^k
            log_prior = torch.where(
                rec.cont,
                torch.full_like(total, math.log(p) + k * math.log(1 - p)),
                torch.full_like(total, k * math.log(1 - p)),
            )
            w = rec.weight
            safe = torch.where(w > 0, w, torch.ones_like(w))
            total = total + torch.where(rec.ran & (w > 0), w * (safe.log() - log_prior), 0.0)
    else:
        for rec in records:
            if rec.gate is None:  # (no token continuing adds zeros: nothing read from the device)
                continue
            if hc.loss == "act":
                term = rec.reach_next
            else:
                conf = rec.q.pow(hc.beta)
                term = conf * (rec.gate if hc.loss == "gate" else rec.reach_next)
            total = total + torch.where(rec.cont, term, 0.0)
    return (total * token_mask).sum() / token_mask.sum().clamp_min(1.0)


def gate_floor(hc, progress: float | None) -> float:
    """The floor f on the gate at ``progress`` (fraction of training done; None: not training):
    ``gate_floor`` at the start, falling linearly to 0 at ``router_warmup_frac``."""
    if progress is None or hc.gate_floor <= 0 or hc.router_warmup_frac <= 0:
        return 0.0
    return hc.gate_floor * max(0.0, 1.0 - progress / hc.router_warmup_frac)


def lambda_at(hc, progress: float | None) -> float:
    """lambda at ``progress``: rising linearly from 0 over ``lambda_warmup_frac``."""
    if progress is None or hc.lambda_warmup_frac <= 0:
        return hc.lambda_
    return hc.lambda_ * min(1.0, progress / hc.lambda_warmup_frac)
