"""A deliberately naive latent forward, for tests only.

Every token runs every latent step over the full sequence with an explicit 2-D mask; halted
tokens' results are computed and then thrown away by the weights, and their keys are hidden by
the mask. Reach, depth and weights are recomputed from their definitions in METHOD.md rather
than with the incremental update the efficient path uses. The efficient
:meth:`AlcotModel.latent_forward` must match this in outputs, loss and gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .halting import StepRecord, adaptive_loss


def naive_mask(alive: list[Tensor], s: int) -> Tensor:
    """[b, 1, s, (k+1) s]: query (t, k) sees key (t', j) iff t' <= t, j <= k, t' ran j."""
    t = torch.arange(s)
    causal = (t[None, :] <= t[:, None])[None]  # [1, s(query), s(key)]
    return torch.cat([causal & ran[:, None, :] for ran in alive], dim=-1)[:, None]


def naive_latent_forward(model, input_ids: Tensor, labels: Tensor):
    """Returns ``(loss, ce, adapt, logits [b, s, V], depth [b, s])``."""
    cfg = model.cfg
    b, s = input_ids.shape
    st = model.state
    st.start_dense()
    freqs = model._rope(s)[:, None, None, :]
    h_in = model._embed(input_ids)

    ran = [torch.ones(b, s, dtype=torch.bool)]
    reach = [torch.ones(b, s)]
    hidden, gates, qs, ces = [], [], [], []
    for k in range(cfg.l_max + 1):
        st.step = k
        st.dense_mask = naive_mask(ran, s)
        h_k = model._pass(h_in, freqs)  # every token, every step
        hidden.append(h_k)
        logits_k = model._logits(h_k)
        ce_k = model._ce(logits_k, labels.t(), keep_logits=True).t()
        ces.append(ce_k)
        qs.append((-ce_k.detach()).exp())
        if k < cfg.l_max:
            g = model.router(h_k, k).t() if model.router is not None else torch.ones(b, s)
            gates.append(g)
            reach.append(reach[k] * g)
            ran.append(ran[k] & (reach[k + 1] >= cfg.halting.tau))
        h_in = h_k

    depth = torch.stack(ran[1:], 0).sum(0) if cfg.l_max else torch.zeros(b, s, dtype=torch.long)
    weights = []
    for k in range(cfg.l_max + 1):
        is_last = depth == k
        before = depth > k
        if k < cfg.l_max:
            w = torch.where(before, reach[k] * (1 - gates[k]), torch.zeros(b, s))
        else:
            w = torch.zeros(b, s)
        weights.append(torch.where(is_last, reach[k], w))

    if cfg.mix == "state":
        mixed = sum(w.t()[..., None] * h for w, h in zip(weights, hidden, strict=True))
        logits = model._logits(mixed)
        ce_tok = model._ce(logits, labels.t(), keep_logits=True).t()
        out_logits = logits.transpose(0, 1)
    else:
        log_w = [torch.where(w > 0, w.clamp_min(1e-30).log(), float("-inf")) for w in weights]
        ce_tok = -torch.logsumexp(
            torch.stack([lw - c for lw, c in zip(log_w, ces, strict=True)]), 0
        )
        lps = [torch.log_softmax(model._logits(h), -1) for h in hidden]
        mix = torch.logsumexp(
            torch.stack([lw.t()[..., None] + lp for lw, lp in zip(log_w, lps, strict=True)]), 0
        )
        out_logits = mix.transpose(0, 1)
    ce = ce_tok.mean()
    if model.router is not None:
        records = []
        for k in range(cfg.l_max + 1):
            last = k == cfg.l_max
            records.append(
                StepRecord(
                    weight=weights[k],
                    ran=ran[k],
                    cont=(depth > k) if not last else torch.zeros_like(ran[k]),
                    gate=gates[k] if not last else None,
                    reach_next=reach[k + 1] if not last else None,
                    q=qs[k],
                    ce=ces[k],
                )
            )
        adapt = adaptive_loss(records, cfg, torch.ones(b, s))
    else:
        adapt = torch.zeros(())
    loss = ce + cfg.halting.lambda_ * adapt
    return loss, ce, adapt, out_logits, depth


def naive_mor_forward(model, input_ids: Tensor, labels: Tensor):
    """Mixture-of-Recursions the slow way: every token runs every recursion over the whole
    sequence in [s, b] layout; a step-k query sees the step-k keys of kept tokens at positions
    up to its own (and its own key, so that no row is empty; the outputs of tokens that were not
    kept are thrown away). Returns ``(loss, ce, aux, logits [b, s, V], depth [b, s])``."""
    from .mor import aux_loss, recursion_update, select

    cfg, mc = model.cfg, model.cfg.mor
    b, s = input_ids.shape
    st = model.state
    st.start_dense(same_step=True)
    freqs = model._rope(s)[:, None, None, :]
    caps = mc.capacities(cfg.l_max)
    t = torch.arange(s)
    causal = t[None, :] <= t[:, None]  # [query, key]
    own = torch.eye(s, dtype=torch.bool)
    state = model._embed(input_ids)
    alive = torch.ones(b, s, dtype=torch.bool)
    kept_steps = []
    aux = torch.zeros(())
    for k in range(cfg.l_max + 1):
        logit = None
        if k > 0:
            logit = model.mor_router(state, k).t()  # [b, s]
            kept = select(logit, alive, caps[k - 1], model.training, mc.threshold)
            aux = aux + aux_loss(logit, alive, kept)
            alive = kept
            kept_steps.append(alive)
        st.step = k
        st.dense_mask = ((causal[None] & alive[:, None, :]) | own[None])[:, None]
        h = model._pass(state, freqs)
        if k == 0:
            state = h
        else:
            upd = recursion_update(
                state.reshape(s * b, -1), h.reshape(s * b, -1), logit.t().reshape(-1), mc.alpha
            ).view_as(state)
            state = torch.where(alive.t()[..., None], upd, state)
    depth = torch.stack(kept_steps).sum(0) if kept_steps else torch.zeros(b, s, dtype=torch.long)
    logits = model._logits(state)
    ce = model._ce(logits, labels.t(), keep_logits=True).mean()
    loss = ce + mc.aux_weight * aux
    return loss, ce, aux, logits.transpose(0, 1), depth
