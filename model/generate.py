"""Incremental decoding with one KV cache per latent step and per-token halting.

Prefill is the training forward with pruning (:meth:`AlcotModel.latent_forward`, run with spare
cache capacity: the caches are preallocated for the prompt and every new token, so decoding
never copies them; a new token's cost grows with the tokens before it only through attention).
Decoding token t: run step 0 against the step-0 cache; then, while k < l_max,
compute g, update the reach, stop if it falls below tau, else feed the hidden state back and run
step k+1, appending its keys/values to the step-(k+1) cache. A halted token's cached keys stay
visible to later tokens at every deeper step (the 2-D mask), exactly as in training, so cached
decoding reproduces a full forward over the generated text.

Latent methods (adaptive, fixed, and vanilla, which is the latent path with ``l_max = 0``) decode
with the caches, and so does Mixture-of-Recursions: a new token runs recursion k iff it ran k-1
and its router's probability reaches the threshold (the causal inference rule, ``model/mor.py``),
appending to the step-k cache that step-k queries alone attend to. Looped, pause and PonderLM
have no per-step cache here: they re-run the full forward for each new token (correct, and fine
for evaluation-sized generations).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .halting import halting_update
from .mor import recursion_update, select
from .network import AlcotModel, log_weight


@dataclass
class Generation:
    tokens: Tensor  # [b, prompt + new]
    depth: Tensor  # [b, prompt + new] executed latent steps of each token
    logits: Tensor  # [b, new, V] next-token logits (log-probs under distribution mixing)


def _pick(logits: Tensor, temperature: float, top_k: int | None, generator) -> Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: AlcotModel,
    prompt: Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    stop=None,
    static: bool | None = None,
    cuda_graph: bool = False,
) -> Generation:
    """Generate ``max_new_tokens`` after ``prompt`` [b, s0] (greedy when temperature is 0).

    ``stop(tokens)`` ([b, prompt + new so far] -> bool), when given, ends generation early (the
    one host read per token left in the loop). Latent methods and MoR decode from the caches:
    ``static`` runs every latent step for every row with fixed shapes and reads nothing from
    the device per token (a halted row is padding); ``static=False`` skips the steps no row
    runs, reading one flag per step (the cheaper choice where a read costs nothing: the CPU);
    None (default) = static on CUDA. Both give the same tokens, logits and depths.
    ``cuda_graph`` (CUDA, static decoding) captures one decoding step in a CUDA graph and
    replays it per token.
    ``max_new_tokens = 0`` returns the prompt (with its executed depths) and no logits."""
    cfg = model.cfg
    b, s0 = prompt.shape
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    total = s0 + max_new_tokens
    if total > cfg.max_seq_len:
        raise ValueError(f"prompt + new tokens = {total} exceeds model.max_seq_len")
    was_training = model.training
    model.eval()
    try:
        if model.pp > 1:
            return _generate_pipeline(
                model, prompt, max_new_tokens, temperature, top_k, generator, stop
            )
        if static is None:
            static = prompt.is_cuda
        if cuda_graph and not static:
            raise ValueError("cuda_graph decoding needs static=True")
        if cfg.method in ("adaptive", "fixed", "vanilla", "mor"):
            return _generate_cached(
                model, prompt, max_new_tokens, temperature, top_k, generator, stop, static,
                cuda_graph,
            )  # fmt: skip
        if cuda_graph:
            raise ValueError(f"cuda_graph decoding needs a cached method, not {cfg.method!r}")
        return _generate_recompute(
            model, prompt, max_new_tokens, temperature, top_k, generator, stop
        )
    finally:
        model.train(was_training)


def _generate_recompute(model, prompt, n, temperature, top_k, generator, stop=None):
    tokens = prompt
    steps = []
    for _ in range(n):
        out = model(tokens, return_logits=True)
        nxt_logits = out.logits[:, -1]
        steps.append(nxt_logits)
        tokens = torch.cat([tokens, _pick(nxt_logits, temperature, top_k, generator)[:, None]], 1)
        if stop is not None and stop(tokens):
            break
    depth = torch.full(tokens.shape, model.cfg.l_max, dtype=torch.long, device=tokens.device)
    return Generation(tokens, depth, _stack_logits(steps, prompt, model))


def _generate_pipeline(model, prompt, n, temperature, top_k, generator, stop=None):
    """Pipeline stages (every stage calls :func:`generate` with the same prompt): each new
    token runs the whole forward of the text so far through the stages, without caches.

    Correct because every method's forward is causal in eval mode (halting and MoR's threshold
    rule read a token's own states), so the full forward's last logits and depths are those of
    cached decoding. What it costs: token t re-runs all 1 + K passes over t positions (O(n^2)
    work for n tokens instead of O(n)), and with one micro-batch in flight P - 1 of the P stages
    wait at any moment. The last stage picks each token and sends it to every stage."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    src = ps.get_pipeline_model_parallel_last_rank()
    group = ps.get_pipeline_model_parallel_group()
    tokens, steps = prompt, []
    out = None
    for _ in range(n):
        out = model(tokens, return_logits=True)
        nxt_logits = out.logits[:, -1]
        steps.append(nxt_logits)
        tok = _pick(nxt_logits, temperature, top_k, generator)
        dist.broadcast(tok, src=src, group=group)
        tokens = torch.cat([tokens, tok[:, None]], 1)
        if stop is not None and stop(tokens):
            break
    depth = model(tokens).depth  # the depths the last token's decoding would have executed
    return Generation(tokens, depth, _stack_logits(steps, prompt, model))


def _stack_logits(steps: list[Tensor], prompt: Tensor, model: AlcotModel) -> Tensor:
    """[b, new, V]; [b, 0, V] when nothing was generated."""
    if steps:
        return torch.stack(steps, 1)
    return torch.zeros(prompt.shape[0], 0, model.cfg.vocab_size, device=prompt.device)


def _generate_cached(
    model, prompt, n, temperature, top_k, generator, stop=None, static=True, cuda_graph=False
):
    b, s0 = prompt.shape
    try:
        # prefill; the caches stay in model.kv with room for n more tokens
        out, _ = model.latent_forward(prompt, return_logits=True, keep_cache=max(n, 1))
        kv = model.kv
        kv.started = [True] * kv.steps  # decoding attends over whole regions: fixed shapes
        rope = model._rope(s0 + n)
        tokens = prompt.new_empty(b, s0 + n)
        tokens[:, :s0] = prompt
        depths = out.depth.new_zeros(b, s0 + n)
        depths[:, :s0] = out.depth
        next_logits = out.logits[:, -1]
        steps = []
        if model.cfg.method == "mor":
            decode = _decode_one_mor if not static else _decode_static_mor
        else:
            decode = _decode_one if not static else _decode_static
        t_dev = torch.full((), s0, dtype=torch.long, device=prompt.device)
        if cuda_graph:
            decode = _captured(model, decode, b, rope, prompt.device)
        for t in range(s0, s0 + n):
            steps.append(next_logits)
            tok = _pick(next_logits, temperature, top_k, generator)
            tokens[:, t] = tok
            # Also run the last token, so every returned depth is one that was really executed.
            if static:
                t_dev.fill_(t)
                next_logits, depths[:, t] = decode(model, tok, t_dev, rope)
            else:
                next_logits, depths[:, t] = decode(model, tok, t, rope)
            if stop is not None and stop(tokens[:, : t + 1]):  # the optional host read
                break
    finally:
        model.kv = None
    end = s0 + len(steps)  # one new token per step taken
    return Generation(tokens[:, :end], depths[:, :end], _stack_logits(steps, prompt, model))


def _captured(model, decode, b: int, rope: Tensor, device):
    """One decoding step captured in a CUDA graph and replayed per token (static shapes, no
    host reads, caches preallocated: what a graph needs). CUDA only."""
    if device.type != "cuda":
        raise ValueError("cuda_graph=True needs the model on a CUDA device")
    tok_in = torch.zeros(b, dtype=torch.long, device=device)
    t_in = torch.zeros((), dtype=torch.long, device=device)
    graph = torch.cuda.CUDAGraph()
    box = {}

    def run(_model, tok, t, _rope):
        if "out" not in box:
            # no warm-up pass: it would append to the caches; the capture itself runs nothing
            tok_in.copy_(tok)
            t_in.copy_(t)
            with torch.cuda.graph(graph):
                box["out"] = decode(model, tok_in, t_in, rope)
        tok_in.copy_(tok)
        t_in.copy_(t)
        graph.replay()
        logits, depth = box["out"]
        return logits.clone(), depth.clone()

    return run


def _decode_static(model: AlcotModel, tok: Tensor, t: Tensor, rope: Tensor):
    """All latent steps of the tokens ``tok`` [b] at position ``t`` (a 0-dim device tensor),
    with fixed shapes and no host reads: every row goes through every step, and a row that has
    halted is padding (its output is dropped, its keys are never visible). Same results as
    :func:`_decode_one`, which skips the steps no row runs at the price of a read per step.

    Returns (next-token logits [b, V], executed latent depth [b]).
    """
    cfg = model.cfg
    b = tok.shape[0]
    dev = tok.device
    h = model._embed(tok[:, None])[0]  # [b, h]
    active = torch.ones(b, dtype=torch.bool, device=dev)
    r = torch.ones(b, device=dev)
    mixed = None
    depth = torch.zeros(b, dtype=torch.long, device=dev)
    rows = torch.arange(b, device=dev)
    pos = t.expand(b)
    for k in range(cfg.l_max + 1):
        if k > 0:
            depth += active.long()
        out, _ = model._packed_pass(h[:, None], rows, pos, 1, k, rope, valid=active)
        h = torch.where(active[:, None], out[:, 0], torch.zeros_like(out[:, 0]))
        last = k == cfg.l_max
        g = None
        if model.router is not None and not last:
            g = torch.where(active, model.router(out[:, 0], k), torch.zeros_like(r))
        weight, cont, r_next = halting_update(r, active, g, last, cfg.halting.tau)
        mixed = _mix(model, mixed, weight, h)
        r, active = r_next, cont
    return _mixed_logits(model, mixed), depth


def _mix(model: AlcotModel, mixed: Tensor | None, weight: Tensor, h: Tensor) -> Tensor:
    """Add one latent step's output ``h`` [b, hidden] with its weights [b] to the mixture."""
    if model.cfg.mix == "state":  # fp32, as in training
        contrib = weight[:, None] * h.float()
        return contrib if mixed is None else mixed + contrib
    term = log_weight(weight)[:, None] + model._vocab_log_softmax(model._logits(h))
    return term if mixed is None else torch.logaddexp(mixed, term)


def _mixed_logits(model: AlcotModel, mixed: Tensor) -> Tensor:
    """The next-token logits [b, V] of a finished mixture."""
    if model.cfg.mix == "state":
        mixed = model._logits(mixed.to(model.compute_dtype))
    return model._gather_vocab(mixed)


def _decode_static_mor(model: AlcotModel, tok: Tensor, t: Tensor, rope: Tensor):
    """Mixture-of-Recursions with fixed shapes and no host reads (see :func:`_decode_static`).

    Returns (next-token logits [b, V], executed recursions beyond step 0 [b])."""
    cfg, mc = model.cfg, model.cfg.mor
    b = tok.shape[0]
    dev = tok.device
    h = model._embed(tok[:, None])[0]  # [b, h]
    active = torch.ones(b, dtype=torch.bool, device=dev)
    depth = torch.zeros(b, dtype=torch.long, device=dev)
    rows = torch.arange(b, device=dev)
    pos = t.expand(b)
    for k in range(cfg.l_max + 1):
        logit = None
        if k > 0:
            logit = model.mor_router(h, k)
            active = select(logit[:, None], active[:, None], 1.0, False, mc.threshold)[:, 0]
            depth += active.long()
        out, _ = model._packed_pass(h[:, None], rows, pos, 1, k, rope, valid=active)
        new = out[:, 0] if k == 0 else recursion_update(h, out[:, 0], logit, mc.alpha)
        h = torch.where(active[:, None], new.to(h.dtype), h)
    return model._gather_vocab(model._logits(h)), depth


def _decode_one(model: AlcotModel, tok: Tensor, t: int, rope: Tensor):
    """Run all latent steps of the tokens ``tok`` [b] at position ``t``, appending to the caches.

    Returns (next-token logits [b, V], executed latent depth [b]).
    """
    cfg = model.cfg
    b = tok.shape[0]
    dev = tok.device
    h = model._embed(tok[:, None])[0]  # [b, h]
    active = torch.ones(b, dtype=torch.bool, device=dev)
    r = torch.ones(b, device=dev)
    mixed = None
    depth = torch.zeros(b, dtype=torch.long, device=dev)
    for k in range(cfg.l_max + 1):
        # the one read of a step (none at step 0: every row)
        rows = torch.arange(b, device=dev) if k == 0 else active.nonzero()[:, 0]
        if rows.numel() == 0:
            break
        depth += active.long() if k > 0 else 0
        pos = torch.full_like(rows, t)
        out, _ = model._packed_pass(h[rows][:, None], rows, pos, 1, k, rope)
        h = out.new_zeros(b, out.shape[-1]).index_put((rows,), out[:, 0])
        last = k == cfg.l_max
        g = None
        if model.router is not None and not last:
            g = r.new_zeros(b).index_put((rows,), model.router(out[:, 0], k))
        weight, cont, r_next = halting_update(r, active, g, last, cfg.halting.tau)
        mixed = _mix(model, mixed, weight, h)
        r, active = r_next, cont
    return _mixed_logits(model, mixed), depth


def _decode_one_mor(model: AlcotModel, tok: Tensor, t: int, rope: Tensor):
    """Mixture-of-Recursions: every recursion of the tokens ``tok`` [b] at position ``t``.

    Returns (next-token logits [b, V], executed recursions beyond step 0 [b])."""
    cfg, mc = model.cfg, model.cfg.mor
    b = tok.shape[0]
    h = model._embed(tok[:, None])[0]  # [b, h]
    active = torch.ones(b, dtype=torch.bool, device=tok.device)
    depth = torch.zeros(b, dtype=torch.long, device=tok.device)
    for k in range(cfg.l_max + 1):
        logit = None
        if k > 0:
            logit = model.mor_router(h, k)
            active = select(logit[:, None], active[:, None], 1.0, False, mc.threshold)[:, 0]
        # the one read of a step (none at step 0: every row)
        rows = torch.arange(b, device=tok.device) if k == 0 else active.nonzero()[:, 0]
        if rows.numel() == 0:
            break
        if k > 0:
            depth += active.long()
        pos = torch.full_like(rows, t)
        out, _ = model._packed_pass(h[rows][:, None], rows, pos, 1, k, rope)
        new = out[:, 0] if k == 0 else recursion_update(h[rows], out[:, 0], logit[rows], mc.alpha)
        h = h.index_put((rows,), new.to(h.dtype))
    return model._gather_vocab(model._logits(h)), depth
