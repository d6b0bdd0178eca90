"""An alcot model in plain PyTorch for Hugging Face transformers (``trust_remote_code=True``).

Written by ``alcot export --hf``; needs only torch and transformers. Every method of alcot is
here: ``adaptive`` (latent steps with a router and per-token halting), ``fixed`` (every token
runs ``l_max`` latent steps), ``vanilla``, ``looped``, ``pause``, ``ponder`` (PonderLM, whose
pondering embeddings accumulate as published) and ``mor`` (Mixture-of-Recursions with its causal
inference rule: a token that ran recursion k-1 runs k iff its router's probability reaches the
threshold; recursion k attends to the keys of recursion k only).

Latent steps are computed the straightforward way: step k runs the whole sequence through the
shared stack, and a 2-D mask lets query (t, k) see key (t', j) iff t' <= t, j <= k and token
t' executed step j; a token stops after its last step K_t = max{k : reach_t(k) >= tau}. The
outputs of tokens that stopped are discarded by the halting weights, so the result equals
alcot's packed computation (which runs only the active tokens). ``forward`` returns, beside
the logits, ``depth`` [batch, seq]: the latent steps each position executed. ``generate()``
decodes with a KV cache (:class:`AlcotCache`: per layer, the keys and values of every latent
step, or every pass, over the positions so far, and which positions executed each step), so a
new token runs only its own passes; the cached result equals the full forward's. Pause tokens
have no cache (each new token recomputes the text). Halting is per token as in alcot; set
``model.config.tau`` / ``model.config.l_max`` to change the test-time budget. Loading with
``dtype=torch.bfloat16`` keeps the routers in fp32 (``_keep_in_fp32_modules_strict``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_alcot import AlcotConfig


@dataclass
class AlcotCausalLMOutput(CausalLMOutput):
    depth: torch.LongTensor | None = None
    cache: object | None = None  # the AlcotCache to continue from (transformers' name)


class AlcotCache:
    """Keys and values of every layer per latent step (per pass for the plain methods) over
    the positions decoded so far, and per step which positions executed it.

    A forward over new tokens (the prompt, then one token at a time) attends to the cached
    positions and its own; the new keys are added when it returns (:meth:`commit`)."""

    def __init__(self):
        self.length = 0
        self.kv: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.ran: dict[int, torch.Tensor] = {}  # step -> [b, length] bool
        self.pending: dict = {}
        self.pending_ran: dict[int, torch.Tensor] = {}

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def view(self, layer: int, step: int, steps):
        return _CacheView(self, layer, step, steps)

    def ran_upto(self, step: int, new: torch.Tensor) -> torch.Tensor:
        """[b, length + n]: which positions executed ``step`` (the new ones: ``new``)."""
        self.pending_ran[step] = new
        old = self.ran.get(step)
        return new if old is None else torch.cat([old, new], dim=1)

    def commit(self, n: int) -> None:
        for key, (k, v) in self.pending.items():
            old = self.kv.get(key)
            self.kv[key] = (k, v) if old is None else (
                torch.cat([old[0], k], dim=2), torch.cat([old[1], v], dim=2)
            )  # fmt: skip
        for step, r in self.pending_ran.items():
            old = self.ran.get(step)
            self.ran[step] = r if old is None else torch.cat([old, r], dim=1)
        self.pending, self.pending_ran = {}, {}
        self.length += n


class _CacheView:
    """What one layer's attention of one step sees: the cached and new keys of ``steps``."""

    def __init__(self, cache: AlcotCache, layer: int, step: int, steps):
        self.cache, self.layer, self.step, self.steps = cache, layer, step, steps

    def extend(self, k, v):
        c = self.cache
        c.pending[(self.layer, self.step)] = (k, v)
        ks, vs = [], []
        for j in self.steps:
            old = c.kv.get((self.layer, j))
            nk, nv = c.pending[(self.layer, j)]
            ks.append(nk if old is None else torch.cat([old[0], nk], dim=2))
            vs.append(nv if old is None else torch.cat([old[1], nv], dim=2))
        return torch.cat(ks, dim=2), torch.cat(vs, dim=2)


def _rotate_half(x):
    x1, x2 = torch.chunk(x, 2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    """Megatron's fused QKV layout: per key/value group, its query heads, then K, then V."""

    def __init__(self, cfg: AlcotConfig):
        super().__init__()
        self.nh, self.ng = cfg.num_attention_heads, cfg.num_key_value_heads
        self.hd = cfg.hidden_size // cfg.num_attention_heads
        self.linear_qkv = nn.Linear(cfg.hidden_size, (self.nh + 2 * self.ng) * self.hd, bias=False)
        self.linear_proj = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, cache: list | None, mask):
        """x [b, s, h]; ``cache`` holds the keys/values of earlier latent steps (appended to);
        ``mask`` [b, 1, s, (k+1) s] (True: may attend) or None for causal attention."""
        b, s, _ = x.shape
        per = self.nh // self.ng
        qkv = self.linear_qkv(x).view(b, s, self.ng, (per + 2) * self.hd)
        q, k, v = torch.split(qkv, [per * self.hd, self.hd, self.hd], dim=-1)
        q = q.reshape(b, s, self.nh, self.hd).transpose(1, 2)
        k = k.transpose(1, 2)
        v = v.transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if isinstance(cache, _CacheView):
            k, v = cache.extend(k, v)
        elif cache is not None:
            cache.append((k, v))
            k = torch.cat([c[0] for c in cache], dim=2)
            v = torch.cat([c[1] for c in cache], dim=2)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.ng != self.nh
        )
        return self.linear_proj(out.transpose(1, 2).reshape(b, s, self.nh * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: AlcotConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = torch.chunk(self.linear_fc1(x), 2, dim=-1)
        return self.linear_fc2(F.silu(gate) * up)


class Layer(nn.Module):
    def __init__(self, cfg: AlcotConfig):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.self_attention = Attention(cfg)
        self.pre_mlp_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache, mask):
        x = x + self.self_attention(self.input_layernorm(x), cos, sin, cache, mask)
        return x + self.mlp(self.pre_mlp_layernorm(x))


class Block(nn.Module):
    def __init__(self, cfg: AlcotConfig):
        super().__init__()
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))
        self.final_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def forward(self, x, cos, sin, caches=None, mask=None):
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, None if caches is None else caches[i], mask)
        return self.final_layernorm(x)


class Router(nn.Module):
    def __init__(self, cfg: AlcotConfig):
        super().__init__()
        h = cfg.hidden_size
        self.kind = cfg.router
        if self.kind == "mlp":
            self.net = nn.Sequential(nn.Linear(h, h), nn.SiLU(), nn.Linear(h, 1))
        else:
            n = cfg.l_max if self.kind == "per_step" else 1
            self.steps = nn.ModuleList(nn.Linear(h, 1) for _ in range(n))

    def forward(self, x, step: int):
        x = x.float()
        logit = (
            self.net(x)
            if self.kind == "mlp"
            else self.steps[step if self.kind == "per_step" else 0](x)
        )
        return torch.sigmoid(logit.squeeze(-1))


class MoRRouter(nn.Module):
    """One linear router per recursion (``mor_router.steps.{k-1}``), logits in fp32."""

    def __init__(self, cfg: AlcotConfig):
        super().__init__()
        self.steps = nn.ModuleList(nn.Linear(cfg.hidden_size, 1) for _ in range(cfg.l_max))

    def forward(self, x, step: int):
        return self.steps[step - 1](x.float()).squeeze(-1)


class AlcotPreTrainedModel(PreTrainedModel):
    config_class = AlcotConfig
    base_model_prefix = "alcot"
    _no_split_modules = ["Layer"]
    _supports_cache_class = False
    # g and halting in fp32, as in alcot (the strict list applies to bf16 too)
    _keep_in_fp32_modules = ["router", "mor_router"]
    _keep_in_fp32_modules_strict = ["router", "mor_router"]

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model brings its own cache (AlcotCache)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)


class AlcotForCausalLM(AlcotPreTrainedModel, GenerationMixin):
    def __init__(self, config: AlcotConfig):
        super().__init__(config)
        cfg = config
        self.embedding = nn.Module()
        self.embedding.weight = nn.Parameter(torch.zeros(cfg.vocab_size, cfg.hidden_size))
        self.block = Block(cfg)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        uses_router = cfg.method == "adaptive" and cfg.l_max > 0 and cfg.router != "none"
        self.router = Router(cfg) if uses_router else None
        if cfg.method == "mor":
            self.mor_router = MoRRouter(cfg)
        if cfg.method == "pause":
            self.pause = nn.Parameter(torch.zeros(cfg.l_max, cfg.hidden_size))
        self.post_init()

    # embeddings, for transformers' utilities
    def get_input_embeddings(self):
        emb = nn.Embedding(self.config.vocab_size, self.config.hidden_size)
        emb.weight = self.embedding.weight
        return emb

    def get_output_embeddings(self):
        return self.head

    # ------------------------------------------------------------------ pieces
    def _rope(self, positions):
        hd = self.config.hidden_size // self.config.num_attention_heads
        inv = 1.0 / (
            self.config.rope_theta
            ** (torch.arange(0, hd, 2, dtype=torch.float32, device=positions.device) / hd)
        )
        freqs = torch.outer(positions.float(), inv)
        emb = torch.cat([freqs, freqs], dim=-1)  # [s, hd]
        return emb.cos()[None, None], emb.sin()[None, None]

    def _embed(self, ids):
        e = F.embedding(ids, self.embedding.weight)
        s = self.config.embed_scale
        return e * s if s != 1.0 else e

    def _logits(self, h):
        return self.head(h).float()

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids,
        attention_mask=None,
        labels=None,
        cache=None,
        past_key_values=None,
        use_cache=None,
        **kwargs,
    ):
        """``cache`` (or ``past_key_values``): an :class:`AlcotCache` to continue from, with
        ``input_ids`` the tokens after its positions; ``use_cache`` starts one. The output's
        ``depth`` and ``logits`` cover ``input_ids``."""
        cfg = self.config
        b, s = input_ids.shape
        cache = cache if isinstance(cache, AlcotCache) else past_key_values
        if not isinstance(cache, AlcotCache):
            cache = AlcotCache() if use_cache and cfg.method != "pause" else None
        start = 0 if cache is None else cache.length
        if start + s > cfg.max_position_embeddings:
            raise ValueError(
                f"sequence of {start + s} tokens exceeds {cfg.max_position_embeddings}"
            )
        if cfg.method in ("adaptive", "fixed"):
            logits, depth = self._latent(input_ids, cache)
        elif cfg.method == "mor":
            logits, depth = self._mor(input_ids, cache)
        else:
            logits, depth = self._passes(input_ids, cache)
        if cache is not None:
            cache.commit(s)
        loss = None
        if labels is not None:  # transformers' convention: labels are the inputs, shifted here
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
        return AlcotCausalLMOutput(loss=loss, logits=logits, depth=depth, cache=cache)

    def _positions(self, ids, cache):
        """(positions of ``ids`` [n], rope cos/sin) after the cached positions."""
        start = 0 if cache is None else cache.length
        pos = torch.arange(start, start + ids.shape[1], device=ids.device)
        return pos, self._rope(pos)

    @staticmethod
    def _visible(pos, ran_full):
        """[b, n, length + n] bool: key position <= query position and the key executed the
        step (``ran_full`` [b, length + n])."""
        kpos = torch.arange(ran_full.shape[1], device=pos.device)
        return (kpos[None, :] <= pos[:, None])[None] & ran_full[:, None, :]

    def _views(self, cache, step, steps):
        if cache is None:
            return None
        return [cache.view(i, step, steps) for i in range(len(self.block.layers))]

    def _passes(self, ids, cache=None):
        """vanilla / looped / ponder / pause: ordinary causal passes (pass j attends to pass
        j's keys: with a cache, those of the cached positions too)."""
        cfg = self.config
        b, s = ids.shape
        emb = self._embed(ids)
        pos = torch.arange(s, device=ids.device)
        mask = None
        if cache is not None:
            pos, _ = self._positions(ids, cache)
            mask = self._visible(pos, torch.ones(b, cache.length + s, dtype=torch.bool,
                                                 device=ids.device))[:, None]  # fmt: skip
        if cfg.method == "pause":
            k = cfg.l_max
            scaled = self.pause * cfg.embed_scale if cfg.embed_scale != 1.0 else self.pause
            pauses = scaled.to(emb.dtype)[None, None].expand(b, s, k, -1)
            seq = torch.cat([emb[:, :, None], pauses], dim=2).reshape(b, s * (k + 1), -1)
            cos, sin = self._rope(pos.repeat_interleave(k + 1))
            h = self.block(seq, cos, sin).reshape(b, s, k + 1, -1)[:, :, k]
        else:
            cos, sin = self._rope(pos)
            h = self.block(emb, cos, sin, self._views(cache, 0, [0]), mask)
            u = emb
            for j in range(cfg.l_max if cfg.method in ("looped", "ponder") else 0):
                if cfg.method == "ponder":  # u <- u + s E[p] (published); reset: emb + s E[p]
                    probs = torch.softmax(self._logits(h), dim=-1)
                    e = probs.to(self.embedding.weight.dtype) @ self.embedding.weight
                    base = u if cfg.ponder_update == "accumulate" else emb
                    u = base + (e * cfg.embed_scale if cfg.embed_scale != 1.0 else e)
                else:
                    u = h
                h = self.block(u, cos, sin, self._views(cache, j + 1, [j + 1]), mask)
        depth = torch.full((b, s), cfg.l_max, dtype=torch.long, device=ids.device)
        return self._logits(h), depth

    def _latent(self, ids, cache=None):
        """adaptive / fixed: latent steps with the 2-D mask and per-token halting. With a
        cache every step runs (a token that stopped is masked out, as in the full forward)."""
        cfg = self.config
        b, s = ids.shape
        dev = ids.device
        pos = torch.arange(s, device=dev)
        cos, sin = self._rope(pos)
        if cache is not None:
            pos, (cos, sin) = self._positions(ids, cache)
        causal = (pos[None, :] <= pos[:, None])[None]  # [1, s, s]
        caches = [[] for _ in self.block.layers]
        h_in = self._embed(ids)
        active = torch.ones(b, s, dtype=torch.bool, device=dev)
        r = torch.ones(b, s, device=dev)
        ran = []
        mixed_state = None
        mixed_logp = None
        for k in range(cfg.l_max + 1):
            if cache is None and not bool(active.any()):
                break
            ran.append(active)
            if cache is None:
                mask = torch.cat([causal & a[:, None, :] for a in ran], dim=-1)[:, None]
                h_k = self.block(h_in, cos, sin, caches, mask)
            else:
                full = [cache.ran_upto(j, a) for j, a in enumerate(ran)]
                mask = torch.cat([self._visible(pos, f) for f in full], dim=-1)[:, None]
                h_k = self.block(h_in, cos, sin, self._views(cache, k, range(k + 1)), mask)
            last = k == cfg.l_max
            zero = torch.zeros_like(r)
            if last:
                weight, cont = torch.where(active, r, zero), torch.zeros_like(active)
            elif self.router is None:
                weight, cont = zero, active
            else:
                g = self.router(h_k, k)
                r_next = r * g
                cont = active & (r_next >= cfg.tau)
                weight = torch.where(cont, r * (1.0 - g), torch.where(active, r, zero))
                r = torch.where(cont, r_next, r)
            if cfg.mix == "state":
                c = weight[..., None].to(h_k.dtype) * h_k
                mixed_state = c if mixed_state is None else mixed_state + c
            else:
                safe = torch.where(weight > 0, weight, torch.ones_like(weight))
                log_w = torch.where(weight > 0, safe.log(), torch.full_like(weight, -math.inf))
                term = log_w[..., None] + torch.log_softmax(self._logits(h_k), dim=-1)
                mixed_logp = term if mixed_logp is None else torch.logaddexp(mixed_logp, term)
            h_in = h_k
            active = cont
        depth = (
            torch.stack(ran[1:], 0).sum(0)
            if len(ran) > 1
            else torch.zeros(b, s, dtype=torch.long, device=dev)
        )
        logits = self._logits(mixed_state) if cfg.mix == "state" else mixed_logp
        return logits, depth

    def _mor(self, ids, cache=None):
        """Mixture-of-Recursions at inference: step 0 for every token; recursion k for the
        tokens that ran k-1 and whose router probability reaches the threshold, attending to
        the step-k keys of such tokens at positions up to their own; a kept token's state
        becomes h + alpha sigmoid(router) f(h), the others keep theirs."""
        cfg = self.config
        b, s = ids.shape
        dev = ids.device
        pos = torch.arange(s, device=dev)
        cos, sin = self._rope(pos)
        if cache is not None:
            pos, (cos, sin) = self._positions(ids, cache)
        causal = (pos[None, :] <= pos[:, None])[None]  # [1, s, s]
        eye = torch.eye(s, dtype=torch.bool, device=dev)[None]
        state = self._embed(ids)
        active = torch.ones(b, s, dtype=torch.bool, device=dev)
        depth = torch.zeros(b, s, dtype=torch.long, device=dev)
        for k in range(cfg.l_max + 1):
            logit = None
            if k > 0:
                logit = self.mor_router(state, k)
                active = active & (torch.sigmoid(logit) >= cfg.mor_threshold)
                if cache is None and not bool(active.any()):
                    break
                depth = depth + active.long()
            # keys: this step's kept tokens; a dropped query sees itself (its output is unused)
            if cache is None:
                mask = ((causal & active[:, None, :]) | eye)[:, None]
                views = [[] for _ in self.block.layers]
            else:
                vis = self._visible(pos, cache.ran_upto(k, active))
                kpos = torch.arange(vis.shape[-1], device=dev)
                mask = (vis | (kpos[None, :] == pos[:, None])[None])[:, None]
                views = self._views(cache, k, [k])
            out = self.block(state, cos, sin, views, mask)
            if k == 0:
                state = out
            else:
                g = torch.sigmoid(logit).to(out.dtype)[..., None]
                state = torch.where(active[..., None], state + cfg.mor_alpha * g * out, state)
        return self._logits(state), depth

    # ------------------------------------------------------------------ generation
    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        """With a cache, only the tokens after its positions (one per step after the prompt)."""
        cache = kwargs.get("cache")
        cache = cache if isinstance(cache, AlcotCache) else kwargs.get("past_key_values")
        use = kwargs.get("use_cache", True) is not False and self.config.method != "pause"
        if isinstance(cache, AlcotCache):
            return {"input_ids": input_ids[:, cache.length :], "cache": cache, "use_cache": True}
        return {"input_ids": input_ids, "use_cache": use}

    def _reorder_cache(self, past, beam_idx):
        return past
