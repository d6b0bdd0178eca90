"""Mixture-of-Recursions (Bae et al., 2025, arXiv 2507.10524): expert-choice recursion routers.

Notation, per token t; step 0 is the ordinary pass, latent step k = 1..l_max is recursion k:

* ``H(0) = f(s E[x_t])``: every token runs the shared stack f once
* score ``g_t(k) = sigmoid(theta_k . H_t(k-1))``, one linear router per step, for the tokens that
  ran step k-1 (they are *eligible*: hierarchical filtering, a token never skips a step and
  comes back)
* training, expert choice: step k keeps, in each sequence of S tokens, the ``int(c_k S)``
  eligible tokens with the highest scores (capacity ``c_k``; the paper's schedule keeps
  (N_r - r + 1) / N_r of the tokens at recursion r, here ``(l_max + 1 - k) / (l_max + 1)``)
* a kept token: ``H(k) = H(k-1) + alpha g_t(k) f(H(k-1))``; every other token keeps ``H(k-1)``.
  The gate in the output is what trains the router through the language-model loss.
* logits ``W H(l_max)``; loss ``CE + aux_weight * L_aux``
* ``L_aux = sum_k mean over eligible t of BCE(theta_k . H_t(k-1), [t kept at step k])``

Recursion-wise KV caching: a step-k query attends to the step-k keys of kept tokens at
positions up to its own (``AttentionState.same_step``), so attention shrinks with the kept set.

**Causality.** Top-k over a sequence compares a token's score with those of *later* tokens, so in
training which tokens run a step depends on the future (the values never do: attention stays
causal). A decoder cannot do that. The paper's remedy, used here: the auxiliary BCE loss trains
each router's own probability to predict whether top-k would keep the token, and at inference a
token recurses iff it is eligible and ``sigmoid(theta_k . H(k-1)) >= threshold`` (0.5), which
needs nothing but the token's own state. ``model.eval()`` switches to this rule, so validation
perplexity and generation are causal; the tests check both the leak in training and its
absence at inference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig


class MoRRouter(nn.Module):
    """theta_k . h + b_k for each latent step k = 1..l_max (fp32, replicated on every TP rank)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.steps = nn.ModuleList(nn.Linear(cfg.hidden_size, 1) for _ in range(cfg.l_max))
        for lin in self.steps:
            nn.init.normal_(lin.weight, std=cfg.init_std)
            nn.init.zeros_(lin.bias)

    def forward(self, hidden: Tensor, step: int) -> Tensor:
        """``hidden`` [..., h] -> router logit [...] for latent step ``step`` (1-based)."""
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return self.steps[step - 1](hidden.float()).squeeze(-1)


def select(
    logit: Tensor, eligible: Tensor, capacity: float, expert_choice: bool, threshold: float
) -> Tensor:
    """Which tokens run the step: [b, s] bool from router logits and the eligible set [b, s].

    ``expert_choice`` (training): the top ``int(capacity * s)`` eligible tokens of each row.
    Otherwise (inference): eligible tokens whose probability reaches ``threshold``.
    """
    if not expert_choice:
        return eligible & (torch.sigmoid(logit) >= threshold)
    b, s = logit.shape
    k = max(1, min(s, int(capacity * s)))
    scores = logit.detach().masked_fill(~eligible, float("-inf"))
    top = scores.topk(k, dim=1).indices
    return torch.zeros_like(eligible).scatter(1, top, True) & eligible


def aux_loss(logit: Tensor, eligible: Tensor, kept: Tensor) -> Tensor:
    """Mean over eligible tokens of BCE(logit, kept): the router learns to predict top-k."""
    bce = F.binary_cross_entropy_with_logits(logit, kept.float(), reduction="none")
    return (bce * eligible).sum() / eligible.sum().clamp_min(1)


def recursion_update(h: Tensor, out: Tensor, logit: Tensor, alpha: float) -> Tensor:
    """``h + alpha g f(h)`` for kept tokens: ``h`` and ``out = f(h)`` [n, h], ``logit`` [n]."""
    g = torch.sigmoid(logit).to(out.dtype)[:, None]
    return h + alpha * g * out
