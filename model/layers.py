"""The transformer layer spec, chosen in one place, and the core attention that makes latent steps
cheap.

Megatron's ``SelfAttention`` computes Q, K, V with its parallel linears and applies rotary
embeddings, then hands ``(query, key, value)`` to a pluggable *core attention* module. That hook
is all the method needs: :class:`LatentCoreAttention` writes a latent pass's keys and values into
the layer's preallocated cache (:class:`LatentKV`) and attends, in one kernel call for the whole
batch, over the cached keys of steps ``0..k`` that each query may see, so earlier steps are never
recomputed. Which tokens a pass runs, where their keys go and who may see whom travel with the
call as a :class:`LatentPass` in Megatron's ``packed_seq_params`` slot (the one argument Megatron
hands unchanged to core attention, also when it recomputes a layer in backward).

Why the cache and its gradients are handled by hand (:class:`_LatentAttention`): a latent step
writes into the same buffer whose earlier slots previous steps' attention saved for backward.
Autograd would copy the buffer per step (memory O(l_max^2)) or refuse the in-place write, so
writes bypass autograd's version counter (they never touch a slot an earlier pass read) and the
key/value gradients are accumulated per slot, in fp32, as the steps' backward passes run from the
last step to the first; each pass hands its own slots' totals to its keys and values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import ModelConfig

_EMPTY = 2**62  # position of an empty cache slot: no query ever sees it


def attention_kernel(cfg: ModelConfig, device: torch.device | None = None) -> str:
    """The single place where the latent attention kernel is chosen.

    ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` with one additive mask per pass
    (shared by every layer), over the padded [batch, max active, cached slots] problem; the
    portable choice, and the fastest measured on CPU (FlexAttention has no CPU backward in torch
    2.13). ``flex``: FlexAttention with a block mask from (row, position, executed step), which
    skips fully masked blocks (compiled on CUDA; forward only on CPU). ``auto`` = sdpa.
    """
    return "sdpa" if cfg.attention_kernel == "auto" else cfg.attention_kernel


@dataclass
class LatentPass:
    """One packed latent pass: ``rows``/``rank`` place each packed token (row after row) in the
    padded query grid [b, width]; ``slots`` are its cache slots; queries see slots
    ``[begin, end)`` where ``allowed`` ([b, width, end - begin] bool) holds. Handed to core
    attention through Megatron's ``packed_seq_params``; ``qkv_format`` tells Megatron it is not a
    THD batch."""

    kv: LatentKV
    step: int
    index: int  # the how-many-th pass into this cache (0 = the first)
    rows: Tensor
    rank: Tensor
    slots: Tensor
    width: int
    end: int
    q_pos: Tensor  # [b, width] position of each padded query (-1: padding)
    # the first pass of a forward runs every token in order into slots 0..s-1: plain causal
    # attention, which the kernels run without a mask (and skipping the upper triangle)
    causal: bool = False
    # no later pass reads this pass's keys (the last step of a forward whose cache is dropped)
    last: bool = False
    begin: int = 0  # first slot the queries may see (their own step's region under same_step)
    # (query, key) pairs the method attends to: an int, or a 0-dim device tensor (not read
    # until the FLOPs are)
    pairs: int | Tensor = 0
    kernel_pairs: int | Tensor = 0  # pairs the chosen kernel computes, masked ones included
    qkv_format: str = "alcot-latent"
    _masks: dict = field(default_factory=dict)

    @property
    def visible(self) -> Tensor:
        """[b, width, end - begin] bool: the (query, key) pairs the method attends to."""
        if "visible" not in self._masks:
            self._masks["visible"] = self.kv.visible(self.q_pos, self.step, self.begin, self.end)
        return self._masks["visible"]

    @property
    def allowed(self) -> Tensor:
        """[b, width, end - begin] bool: who may attend to whom. A padded query attends to
        every slot (all finite: the buffers start at zero); its output is dropped and its
        gradient is zero, so it changes nothing, and no row of the kernel is empty."""
        if "allowed" not in self._masks:
            self._masks["allowed"] = self.visible | (self.q_pos < 0)[:, :, None]
        return self._masks["allowed"]

    def additive_mask(self, dtype: torch.dtype) -> Tensor:
        """[b, 1, width, end]: 0 where allowed, -inf elsewhere; built once per pass and dtype
        (every layer shares it, so autograd saves it once)."""
        if dtype not in self._masks:
            m = torch.zeros(self.allowed.shape, dtype=dtype, device=self.allowed.device)
            self._masks[dtype] = m.masked_fill_(~self.allowed, float("-inf"))[:, None]
        return self._masks[dtype]

    def block_mask(self):
        if "block" not in self._masks:
            from torch.nn.attention.flex_attention import create_block_mask

            allowed = self.allowed

            def mask_mod(b, h, q, k):
                return allowed[b, q, k]

            b, w, e = allowed.shape
            self._masks["block"] = create_block_mask(mask_mod, b, None, w, e, allowed.device)
        return self._masks["block"]


class LatentKV:
    """Preallocated key/value caches of one latent forward (and the decoding that continues it).

    One buffer per layer for keys and one for values, [b, groups, capacity, head_dim], shared by
    all latent steps and laid out in fixed *regions*: step k owns the slots
    ``[k R, (k + 1) R)`` with ``R = region`` (the sequence plus the room kept for decoding), and
    each row fills its region from the front (``fill`` [b, steps] counts the slots each row has
    used per step: per-row lengths, kept on the device). So the slots a step-k query may see
    (steps <= k, positions <= its own, executed) always lie in ``[0, k R + width)`` (its own
    step's region alone under ``same_step``) and reach the kernel as a view, never a copy.
    ``slot_pos`` / ``slot_step`` ([b, capacity]) say which (position, step) each slot holds
    (``_EMPTY`` where none).

    **Shapes that repeat.** The query grid of a pass is ``width`` = the bucket of the largest
    number of tokens a row runs (:func:`bucket`: ``region``, ``region / 2`` or ``region / 4``
    by default), and the key range is fixed by (step, width), so a forward's attention sees at
    most ``1 + l_max * buckets`` shapes whatever the data (a GPU kernel plan, e.g. cuDNN's, is
    built once per shape). Padded queries and empty slots are masked out and cost only kernel
    work (``kernel_pairs``). A decoding pass (a second pass into a step's region) attends over
    whole regions: one shape per step, whatever the length so far.
    """

    def __init__(
        self,
        batch: int,
        region: int,
        steps: int,
        device,
        kernel: str = "sdpa",
        same_step: bool = False,
        keep: bool = False,
        seq: int | None = None,
        buckets: int = 3,
    ):
        self.batch, self.region, self.steps = batch, region, steps
        self.capacity = steps * region
        self.seq = region if seq is None else seq  # tokens per row of the forward
        self.kernel, self.same_step = kernel, same_step
        self.keep = keep  # kept for decoding after the forward
        self.buckets = buckets
        self.slot_pos = torch.full((batch, self.capacity), _EMPTY, dtype=torch.long, device=device)
        self.slot_step = torch.full((batch, self.capacity), -1, dtype=torch.long, device=device)
        self.fill = torch.zeros(batch, steps, dtype=torch.long, device=device)
        self.started = [False] * steps  # host: has a pass written into step k's region yet
        self.passes = 0
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}
        # backward: per (layer, pass) fp32 sums of the key/value gradients of the pass's own
        # tokens ([N, groups, head_dim], packed), and the passes planned under grad
        self.grads: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
        self.plans: list[LatentPass] = []

    def visible(self, q_pos: Tensor, step: int, begin: int, end: int) -> Tensor:
        """[b, width, end - begin] bool: slot visible to query (2-D causality; same step only
        under ``same_step``). A query at position -1 (padding) sees nothing."""
        kp, ks = self.slot_pos[:, begin:end], self.slot_step[:, begin:end]
        seen = (ks == step) if self.same_step else (ks >= 0) & (ks <= step)
        return (kp[:, None, :] <= q_pos[:, :, None]) & seen[:, None, :]

    def plan(
        self,
        rows: Tensor,
        pos: Tensor,
        width: int,
        step: int,
        last: bool = False,
        valid: Tensor | None = None,
    ) -> LatentPass:
        """Place a pass's packed tokens (``rows``/``pos``, row-major; ``width`` = the most
        tokens any row runs, known on the host); ``last``: no later pass will read their keys.
        ``valid`` ([N] bool, decoding with static shapes): the tokens that really run; the
        others go through the kernels as padding and leave nothing visible in the cache.
        Reads nothing from the device."""
        b, dev, n = self.batch, self.slot_pos.device, rows.numel()
        if step >= self.steps:
            raise RuntimeError(f"latent step {step} has no cache region ({self.steps} steps)")
        base = step * self.region
        fresh = not self.started[step]  # decoding passes append to a region already written
        ones = torch.ones_like(rows) if valid is None else valid.long()
        counts = torch.zeros(b, dtype=torch.long, device=dev)
        counts.index_add_(0, rows, ones)
        first = counts.cumsum(0) - counts
        if valid is None:
            rank = torch.arange(n, device=dev) - first[rows]
        else:
            rank = torch.zeros_like(rows)
        slots = base + self.fill[rows, step] + rank
        if valid is None:
            self.slot_pos[rows, slots] = pos
            self.slot_step[rows, slots] = step
        else:  # one token per row: a padded row writes its (unused) slot as still empty
            self.slot_pos[rows, slots] = torch.where(valid, pos, _EMPTY)
            self.slot_step[rows, slots] = torch.where(valid, step, -1)
            pos = torch.where(valid, pos, -1)
        self.fill[:, step] += counts
        self.started[step] = True
        # the query grid and the key range: a bounded set of shapes (see the class docstring)
        w = bucket(width, self.region, self.buckets) if fresh else max(width, 1)
        full = self.passes == 0 and fresh and n == b * self.seq  # every token, in order
        if full:  # plain causal attention over the sequence: its own shape, no padding
            w = self.seq
        if width > self.region:
            raise RuntimeError(
                f"latent KV cache full: {width} slots needed in a region of {self.region}"
            )
        stop = base + w if fresh else base + self.region
        begin = base if self.same_step else 0
        q_pos = torch.full((b, w), -1, dtype=torch.long, device=dev)
        q_pos[rows, rank] = pos
        p = LatentPass(
            self, step, self.passes, rows, rank, slots, w, stop, q_pos, last=last, begin=begin
        )
        # the first pass of a forward over every token in order is plain causal attention
        p.causal = full
        if p.causal:
            p.pairs = b * w * (w + 1) // 2
            p.kernel_pairs = p.pairs
        else:
            p.pairs = p.visible.sum()  # on the device: read when the FLOPs are
            p.kernel_pairs = self._kernel_pairs(p)
        self.passes += 1
        if torch.is_grad_enabled():
            self.plans.append(p)
        return p

    def _kernel_pairs(self, p: LatentPass):
        if self.kernel == "flex":
            bm = p.block_mask()
            qb, kb = bm.BLOCK_SIZE
            return bm.kv_num_blocks.sum() * (qb * kb)
        return self.batch * p.width * (p.end - p.begin)

    def buffers(self, layer: int, like: Tensor) -> tuple[Tensor, Tensor]:
        if layer not in self.keys:
            shape = (self.batch, like.shape[-2], self.capacity, like.shape[-1])
            self.keys[layer] = torch.zeros(shape, dtype=like.dtype, device=like.device)
            self.values[layer] = torch.zeros(shape, dtype=like.dtype, device=like.device)
        return self.keys[layer], self.values[layer]

    def write(self, layer: int, p: LatentPass, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Store a pass's keys/values ([N, groups, head_dim]) in their slots. Through ``.data``:
        autograd's version counter must not see it (earlier passes saved views of the buffer,
        and these slots are outside what they read)."""
        kb, vb = self.buffers(layer, key)
        kb.data[p.rows, :, p.slots] = key.detach().to(kb.dtype)
        vb.data[p.rows, :, p.slots] = value.detach().to(vb.dtype)
        return kb, vb

    def grad_slots(self, layer: int, p: LatentPass, dk: Tensor, dv: Tensor):
        """Hand a pass's key/value gradients over ``[begin, end)`` to the passes whose slots
        they are (this one and, outside ``same_step``, every earlier one), each summed in fp32
        over its own packed tokens only ([N, groups, head_dim]: no buffer over the whole cache
        is kept through backward); return this pass's totals (later passes have all run
        backward by now). Per slot, the sums add the same values in the same order as one
        accumulator over the cache would."""
        for q in self.plans[: p.index + 1]:
            if q.step != p.step if self.same_step else q.step > p.step:
                continue  # its slots lie outside this pass's view
            key = (layer, q.index)
            gk = dk[q.rows, :, q.slots - p.begin]
            gv = dv[q.rows, :, q.slots - p.begin]
            if key not in self.grads:
                self.grads[key] = (
                    torch.zeros(gk.shape, dtype=torch.float32, device=gk.device),
                    torch.zeros(gv.shape, dtype=torch.float32, device=gv.device),
                )
            kg, vg = self.grads[key]
            kg += gk
            vg += gv
        return self.grads.pop((layer, p.index))


def bucket(n: int, cap: int, buckets: int = 3) -> int:
    """The query width of a pass running at most ``n`` tokens per row: the smallest of
    ``cap, cap / 2, ..., cap / 2**(buckets - 1)`` (rounded up) that holds ``n``."""
    w = cap
    for _ in range(buckets - 1):
        half = -(-w // 2)
        if half < n or half == w:
            break
        w = half
    return w


def _kernel(kind: str, q: Tensor, k: Tensor, v: Tensor, p: LatentPass, scale) -> Tensor:
    """q [b, np, width, hn], k/v [b, ng, end - begin, hn] -> [b, np, width, hn]."""
    gqa = k.shape[1] != q.shape[1]
    if kind == "flex":
        fn = _compiled_flex() if q.is_cuda else _eager_flex()
        return fn(q, k, v, block_mask=p.block_mask(), scale=scale, enable_gqa=gqa)
    if p.causal:
        return sdpa(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    return sdpa(q, k, v, attn_mask=p.additive_mask(q.dtype), scale=scale, enable_gqa=gqa)


_BACKENDS = {
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "math": "MATH",
}


def _cuda_backends():
    """The SDPA backends allowed on CUDA, in order of preference: cuDNN, flash, memory-efficient,
    math.

    Why cuDNN first: it builds a kernel plan per new combination of shapes (tens of ms, forward
    and backward) and then reuses it, so it pays only where shapes repeat. They do now (the
    buckets of :class:`LatentKV` bound a forward to ``1 + 3 l_max`` shapes), and measured on an
    H200 (docs/performance.md) it is the fastest for the latent passes' masked rectangles: with
    ``flash,efficient,math`` fixed depth took 0.685 s a step at 160m (seq 2048 x 8), with cuDNN
    first 0.378 s; the trainer's adaptive/fixed time-vs-FLOPs went from 2.16 to 1.83.

    ``ALCOT_SDPA_BACKENDS`` (a comma list of flash, efficient, cudnn, math, in order of
    preference) replaces the list, to measure another choice on a given GPU."""
    from torch.nn.attention import SDPBackend

    names = os.environ.get("ALCOT_SDPA_BACKENDS", "cudnn,flash,efficient,math")
    try:
        return [getattr(SDPBackend, _BACKENDS[n.strip()]) for n in names.split(",") if n.strip()]
    except KeyError as e:
        raise ValueError(
            f"ALCOT_SDPA_BACKENDS: unknown backend {e.args[0]!r} (choose from {sorted(_BACKENDS)})"
        ) from None


def sdpa(q: Tensor, k: Tensor, v: Tensor, **kw) -> Tensor:
    """``F.scaled_dot_product_attention`` with the backends of :func:`_cuda_backends` on CUDA
    (every attention of the model goes through here)."""
    if q.is_cuda:
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(_cuda_backends()):
            return F.scaled_dot_product_attention(q, k, v, **kw)
    return F.scaled_dot_product_attention(q, k, v, **kw)


def _eager_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


_FLEX = {}


def _compiled_flex():
    """FlexAttention is fast only compiled (Triton on CUDA); dynamic shapes keep it from
    recompiling per bucket. Compiled without donated buffers: the latent attention's backward
    differentiates the kernel's graph with ``retain_graph`` (a pipeline stage may run it more
    than once), which AOTAutograd refuses for a graph that donates its saved buffers."""
    if "fn" not in _FLEX:
        compiled = torch.compile(_eager_flex(), dynamic=True)

        def run(*args, **kwargs):
            import torch._functorch.config as functorch_config

            with functorch_config.patch(donated_buffer=False):
                return compiled(*args, **kwargs)

        _FLEX["fn"] = run
    return _FLEX["fn"]


class _LatentAttention(torch.autograd.Function):
    """Write a pass's keys/values into the layer cache and attend over the visible prefix, with
    the cache's gradients accumulated per slot (see the module docstring)."""

    @staticmethod
    def forward(ctx, q: Tensor, key: Tensor, value: Tensor, p: LatentPass, layer: int, scale):
        kb, vb = p.kv.write(layer, p, key, value)
        with torch.enable_grad():
            qd = q.detach().requires_grad_()
            kd = kb[:, :, p.begin : p.end].detach().requires_grad_()
            vd = vb[:, :, p.begin : p.end].detach().requires_grad_()
            out = _kernel(p.kv.kernel, qd, kd, vd, p, scale)
        # saved, not kept as attributes: autograd frees them after backward (and keeps them
        # for a second backward under retain_graph)
        ctx.save_for_backward(qd, kd, vd, out)
        ctx.p, ctx.layer, ctx.kdtype = p, layer, key.dtype
        return out.detach()

    @staticmethod
    def backward(ctx, grad: Tensor):
        qd, kd, vd, out = ctx.saved_tensors
        dq, dk, dv = torch.autograd.grad(out, (qd, kd, vd), grad, retain_graph=True)
        dkey, dvalue = ctx.p.kv.grad_slots(ctx.layer, ctx.p, dk, dv)
        return dq, dkey.to(ctx.kdtype), dvalue.to(ctx.kdtype), None, None, None


class AttentionState:
    """How the non-latent passes attend, for the core attention of every layer.

    ``mode == "causal"``: ordinary causal self-attention over the pass's own keys (vanilla,
    looped, pause, PonderLM). Latent passes do not use this: their :class:`LatentPass` arrives
    with the call.

    ``mode == "dense"`` (the naive test reference): every token runs every step in [s, b]
    layout; keys of all steps are concatenated and ``dense_mask`` ([b, 1, s, (step+1) s]) hides
    what was not executed. ``same_step`` (Mixture-of-Recursions' recursion-wise KV caching): a
    step-k query attends to the step-k keys only; ``dense_mask`` is then [b, 1, s, s].
    """

    def __init__(self):
        self.start_causal()

    def start_causal(self) -> None:
        self.mode = "causal"
        self.same_step = False
        self.kv: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
        self.step = 0
        self.dense_mask: Tensor | None = None

    def start_dense(self, same_step: bool = False) -> None:
        self.start_causal()
        self.mode = "dense"
        self.same_step = same_step

    def visible_steps(self) -> range:
        """The steps whose keys the current step's queries attend to (dense mode)."""
        return range(self.step, self.step + 1) if self.same_step else range(self.step + 1)


class LatentCoreAttention(torch.nn.Module):
    """Core attention for the causal, packed-latent and dense-latent passes.

    Megatron calls it with ``query`` [sq, b, np, hn] and ``key`` / ``value`` [sq, b, ng, hn]
    (local heads under tensor parallelism) and expects [sq, b, np * hn] back. A latent pass has
    sq = N packed tokens and b = 1, and its :class:`LatentPass` in ``packed_seq_params``.
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type=None,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        state: AttentionState | None = None,
    ):
        super().__init__()
        if state is None:
            raise ValueError("LatentCoreAttention needs the model's AttentionState")
        self.config = config
        self.layer = layer_number
        self.state = state
        self.scale = softmax_scale

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None = None,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ) -> Tensor:
        if isinstance(packed_seq_params, LatentPass):
            return self._latent(query, key, value, packed_seq_params)
        st = self.state
        sq, b, n_heads, hn = query.shape
        if st.mode == "dense":
            st.kv[(self.layer, st.step)] = (key, value)
            key = torch.cat([st.kv[(self.layer, j)][0] for j in st.visible_steps()])
            value = torch.cat([st.kv[(self.layer, j)][1] for j in st.visible_steps()])
            mask, causal = st.dense_mask, False
        else:
            mask, causal = None, True
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = sdpa(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=causal,
            scale=self.scale,
            enable_gqa=k.shape[1] != q.shape[1],
        )
        return out.permute(2, 0, 1, 3).reshape(sq, b, n_heads * hn)

    def _latent(self, query: Tensor, key: Tensor, value: Tensor, p: LatentPass) -> Tensor:
        b, n_heads, hn = p.kv.batch, query.shape[2], query.shape[3]
        k, v = key[:, 0], value[:, 0]  # [N, ng, hn]
        if p.causal:  # every token in order: the packed rows are the padded grid already
            q = query[:, 0].view(b, p.width, n_heads, hn).transpose(1, 2)
        else:
            q = query.new_zeros(b, p.width, n_heads, hn)
            q = q.index_put((p.rows, p.rank), query[:, 0]).transpose(1, 2)  # [b, np, width, hn]
        if p.causal and p.last:  # nothing else reads these keys: no cache at all
            kt, vt = (t.view(b, p.width, -1, hn).transpose(1, 2) for t in (k, v))
            o = _kernel(p.kv.kernel, q, kt, vt, p, self.scale)
        elif torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            o = _LatentAttention.apply(q, k, v, p, self.layer, self.scale)
        else:  # evaluation, decoding, or the no-grad first pass of a recomputed layer
            kb, vb = p.kv.write(self.layer, p, k, v)
            kv = kb[:, :, p.begin : p.end], vb[:, :, p.begin : p.end]
            o = _kernel(p.kv.kernel, q, *kv, p, self.scale)
        o = o.transpose(1, 2)
        if p.causal:
            return o.reshape(-1, 1, n_heads * hn)
        return o[p.rows, p.rank].reshape(-1, 1, n_heads * hn)


def use_transformer_engine(cfg: ModelConfig) -> bool:
    """The single place where the backend is chosen: TE on GPU when importable, else local."""
    if cfg.spec == "local":
        return False
    try:
        import transformer_engine  # noqa: F401

        have_te = True
    except Exception:
        have_te = False
    if cfg.spec == "te":
        if not (have_te and torch.cuda.is_available()):
            raise RuntimeError("model.spec='te' needs CUDA and TransformerEngine")
        return True
    return have_te and torch.cuda.is_available()


def init_seed(base: int, part: int) -> int:
    """The seed a part of the model draws its initial weights from: part 0 the embeddings,
    n in 1..L transformer layer n (global numbering), L + 1 onwards the head and routers."""
    return (base * 1_000_003 + part) % (2**63 - 1)


def _seeded_layer():
    """Megatron's ``TransformerLayer`` that seeds the CPU generator from (the model's init seed,
    its global layer number) before building its weights.

    Why: Megatron initialises on CPU from the default generator (``use_cpu_initialization``), so
    a layer's weights would depend on how many weights were drawn before it, i.e. on which
    pipeline stage builds it. Seeded per layer, a run starts from the same weights at any
    pipeline (and tensor) layout, so a study may change layouts without changing its models."""
    from megatron.core.transformer.transformer_layer import (
        TransformerLayer,
        get_transformer_layer_offset,
    )

    class SeededTransformerLayer(TransformerLayer):
        def __init__(self, config, *args, init_seed_base: int, layer_number: int = 1, **kwargs):
            # the block numbers its layers per stage; Megatron's offset makes it global
            offset = get_transformer_layer_offset(config, kwargs.get("vp_stage"))
            seed = init_seed(init_seed_base, layer_number + offset)
            torch.random.default_generator.manual_seed(seed)
            super().__init__(config, *args, layer_number=layer_number, **kwargs)

    return SeededTransformerLayer


def build_block_spec(
    cfg: ModelConfig, state: AttentionState, num_layers: int | None = None, seed: int = 0
):
    """Megatron ``TransformerBlockSubmodules`` for a Llama block with our core attention
    (``num_layers``: this pipeline stage's share, from Megatron's ``get_num_layers_to_build``;
    ``seed``: the model's init seed, from which each layer seeds its weights).

    Local spec (CPU, or GPU without TransformerEngine): Megatron's Column/RowParallelLinear and
    torch RMSNorm. TE spec: TE's fused norm+linear layers and TE RMSNorm. The final norm is set
    explicitly: Megatron's default picks apex's fused norm whenever any module named ``apex`` is
    importable, which breaks RMSNorm.
    """
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
    from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

    core = ModuleSpec(module=LatentCoreAttention, params={"state": state})
    if use_transformer_engine(cfg):
        from megatron.core.extensions.transformer_engine import (
            TELayerNormColumnParallelLinear,
            TENorm,
            TERowParallelLinear,
        )

        input_norm = mlp_norm = IdentityOp  # fused into the following linear
        qkv, proj, fc1, fc2, final_norm = (
            TELayerNormColumnParallelLinear,
            TERowParallelLinear,
            TELayerNormColumnParallelLinear,
            TERowParallelLinear,
            TENorm,
        )
    else:
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        input_norm = mlp_norm = final_norm = WrappedTorchNorm
        qkv, proj, fc1, fc2 = (
            ColumnParallelLinear,
            RowParallelLinear,
            ColumnParallelLinear,
            (RowParallelLinear),
        )

    layer = ModuleSpec(
        module=_seeded_layer(),
        params={"init_seed_base": seed},
        submodules=TransformerLayerSubmodules(
            input_layernorm=input_norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=qkv,
                    core_attention=core,
                    linear_proj=proj,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=mlp_norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=fc1, linear_fc2=fc2)),
            mlp_bda=get_bias_dropout_add,
        ),
    )
    n = cfg.num_layers if num_layers is None else num_layers
    return TransformerBlockSubmodules(layer_specs=[layer] * n, layer_norm=final_norm)


def transformer_config(cfg: ModelConfig, params_dtype: torch.dtype = torch.float32):
    """Megatron ``TransformerConfig`` for our Llama block.

    Fusions that compile with inductor on CPU (4-26 s first step) are off; weights are always
    initialised on the CPU from one master copy, so a tensor-parallel model starts from exactly
    the same weights as a single-process one with the same seed.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    init = _normal_init(cfg.init_std)
    out_init = _normal_init(cfg.init_std / (2.0 * cfg.num_layers) ** 0.5)
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        ffn_hidden_size=cfg.ffn_hidden_size,
        kv_channels=cfg.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False,
        tensor_model_parallel_size=cfg.tensor_parallel_size,
        pipeline_model_parallel_size=cfg.pipeline_parallel_size,
        pipeline_dtype=params_dtype,
        sequence_parallel=False,
        use_cpu_initialization=True,
        perform_initialization=True,
        init_method=init,
        output_layer_init_method=out_init,
        init_method_std=cfg.init_std,
        params_dtype=params_dtype,
        **_recompute(cfg),
    )


def _recompute(cfg: ModelConfig) -> dict:
    """Megatron's activation-recompute settings for ``model.recompute``."""
    if cfg.recompute == "full":
        return dict(
            recompute_granularity="full",
            recompute_method=cfg.recompute_method,
            recompute_num_layers=cfg.recompute_num_layers,
        )
    if cfg.recompute == "selective":
        return dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    return {}


def _normal_init(std: float):
    def init_(tensor: Tensor) -> Tensor:
        return torch.nn.init.normal_(tensor, mean=0.0, std=std)

    return init_
