"""The Llama decoder with token-level adaptive latent chain-of-thought, and its baselines.

Layout follows Megatron: hidden states are [sequence, batch, hidden]; token ids and per-token
quantities (reach, weights, depth) are [batch, sequence]. The parallel layers (vocab-parallel
embedding and LM head, the transformer block's column/row-parallel linears) are Megatron-Core's,
so the same code runs tensor parallel; everything the method adds (router, halting, mixing) is
replicated on each tensor-parallel rank and sees identical inputs there.

How a latent forward saves compute (METHOD.md, "Parallel masking"): step k is one pass of the
shared stack over only the tokens still active, packed row after row into one [N_k, 1, h]
sequence (no padding: every matmul costs exactly the executed tokens). The pass writes its
keys/values into the preallocated per-layer caches (``model/layers.py``: ``LatentKV``), which hold
executed tokens only, and each query attends, in one kernel call per layer for the whole batch,
to the cached keys of steps 0..k at positions up to its own: key (t', k') is visible to query
(t, k) iff t' <= t, k' <= k and t' executed k'. Earlier steps are never recomputed. The caches
are dropped when the forward returns (autograd keeps what backward needs), unless decoding is to
continue from them.

Precision: the model runs in the dtype of its parameters (bf16 under ``train.precision: bf16``,
see ``model/precision.py``); the router, the halting quantities (gates, reach, weights), the
state mixing and the losses are computed in fp32 whatever that dtype is.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .compat import ensure_cpu_compat
from .config import ModelConfig, count_parameters
from .flops import Flops, FlopTally, causal_pairs, nominal_flops, paper_flops
from .halting import Router, StepRecord, adaptive_loss, gate_floor, halting_update, lambda_at
from .layers import (
    AttentionState,
    LatentKV,
    attention_kernel,
    build_block_spec,
    init_seed,
    transformer_config,
)
from .mor import MoRRouter, aux_loss, recursion_update, select
from .outputs import LatentTrace, Micro, ModelOutput, PassRequest


class AlcotModel(nn.Module):
    """All methods of ``ModelConfig.method`` in one module (they share every weight name)."""

    def __init__(self, cfg: ModelConfig, params_dtype: torch.dtype = torch.float32):
        super().__init__()
        ensure_cpu_compat()
        from megatron.core import parallel_state as ps

        if not ps.model_parallel_is_initialized():
            raise RuntimeError("call alcot.model.init_parallel() before building a model")
        if ps.get_tensor_model_parallel_world_size() != cfg.tensor_parallel_size:
            raise RuntimeError(
                f"model.tensor_parallel_size={cfg.tensor_parallel_size} but the process group "
                f"has {ps.get_tensor_model_parallel_world_size()} tensor-parallel ranks"
            )
        if ps.get_pipeline_model_parallel_world_size() != cfg.pipeline_parallel_size:
            raise RuntimeError(
                f"model.pipeline_parallel_size={cfg.pipeline_parallel_size} but the process group "
                f"has {ps.get_pipeline_model_parallel_world_size()} pipeline stages"
            )
        from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
        from megatron.core.tensor_parallel.layers import (
            ColumnParallelLinear,
            VocabParallelEmbedding,
        )
        from megatron.core.transformer.transformer_block import (
            TransformerBlock,
            get_num_layers_to_build,
        )

        self.cfg = cfg
        self.tcfg = transformer_config(cfg, params_dtype)
        self.state = AttentionState()
        self.kv: LatentKV | None = None  # the latent caches, between prefill and decoding
        # fraction of training done, set by the trainer before each step (None: not training);
        # the router's warm-up and the lambda warm-up read it (model/halting.py)
        self.halting_progress: float | None = None
        # Pipeline stage: Megatron's TransformerBlock builds this stage's contiguous layers
        # (get_num_layers_to_build / get_transformer_layer_offset; layer numbers stay global, so
        # each layer's latent cache is keyed as in one process). Embeddings (and pause vectors)
        # live on the first stage; the final norm, head and routers on the last.
        self.pp = cfg.pipeline_parallel_size
        self.stage = ps.get_pipeline_model_parallel_rank()
        self.first, self.last = self.stage == 0, self.stage == self.pp - 1
        # Initial weights: one draw of the caller's generator (torch.manual_seed(seed) before
        # building) gives the model's init seed; each part (embeddings, every layer by its
        # global number, head, routers, pause vectors) seeds its own draws from it, so the
        # weights do not depend on the pipeline layout (layers.init_seed). The caller's
        # generator is left one draw further on, whatever the layout.
        base = int(torch.randint(0, 2**62, (1,)).item())
        cpu = torch.random.default_generator
        last_part = cfg.num_layers + 1
        with torch.random.fork_rng(devices=[]):
            self.embedding = None
            if self.first:
                cpu.manual_seed(init_seed(base, 0))
                self.embedding = VocabParallelEmbedding(
                    cfg.vocab_size,
                    cfg.hidden_size,
                    init_method=self.tcfg.init_method,
                    config=self.tcfg,
                )
            # pre_process=True on every stage: we hand each stage its input directly instead
            # of through Megatron's set_input_tensor; post_process builds the final norm.
            self.block = TransformerBlock(
                self.tcfg,
                build_block_spec(cfg, self.state, get_num_layers_to_build(self.tcfg), base),
                post_layer_norm=True,
                pre_process=True,
                post_process=self.last,
            )
            self.head = None
            if self.last:
                cpu.manual_seed(init_seed(base, last_part))
                self.head = ColumnParallelLinear(
                    cfg.hidden_size,
                    cfg.vocab_size,
                    config=self.tcfg,
                    init_method=self.tcfg.init_method,
                    bias=False,
                    gather_output=False,
                )
            self.rotary = RotaryEmbedding(
                kv_channels=cfg.head_dim,
                rotary_percent=1.0,
                rotary_base=cfg.rotary_base,
                use_cpu_initialization=True,
            )
            self.router = self.mor_router = self.pause = None
            if cfg.uses_router and self.last:
                cpu.manual_seed(init_seed(base, last_part + 1))
                self.router = Router(cfg)
            if cfg.method == "mor" and self.last:
                cpu.manual_seed(init_seed(base, last_part + 2))
                self.mor_router = MoRRouter(cfg)
            if cfg.method == "pause" and self.first:
                cpu.manual_seed(init_seed(base, last_part + 3))
                self.pause = nn.Parameter(torch.randn(cfg.l_max, cfg.hidden_size) * cfg.init_std)

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return next(self.block.parameters()).device

    def num_parameters(self) -> dict[str, int]:
        return count_parameters(self.cfg)

    def _embed(self, ids: Tensor) -> Tensor:
        """[b, s] ids -> [s, b, h] scaled embeddings."""
        emb = self.embedding(ids).transpose(0, 1).contiguous()
        return self._scale(emb)

    def _scale(self, emb: Tensor) -> Tensor:
        """s * (an input embedding): token, pause and expected embeddings all enter this way."""
        return emb * self.cfg.embed_scale if self.cfg.embed_scale != 1.0 else emb

    def _rope(self, length: int) -> Tensor:
        """Rotary angles [length, head_dim]."""
        if length > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {length} exceeds model.max_seq_len")
        return self.rotary(length)[:, 0, 0, :].to(self.device)

    def _progress(self) -> float | None:
        return self.halting_progress if self.training else None

    def halting_lambda(self) -> float:
        """lambda as this forward weighs the adaptive loss (``lambda_warmup_frac``)."""
        return lambda_at(self.cfg.halting, self._progress())

    def _logits(self, hidden: Tensor) -> Tensor:
        """[..., h] -> vocab-parallel logits [..., V/tp] in fp32."""
        out, _ = self.head(hidden)
        return out.float()

    def _ce(self, logits: Tensor, labels_sb: Tensor, keep_logits: bool = False) -> Tensor:
        """Per-token cross entropy [s, b]. Megatron's kernel overwrites its input with
        exp(logits - max) to save memory, so pass ``keep_logits`` when they are used again."""
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        logits = logits.clone() if keep_logits else logits.contiguous()
        return vocab_parallel_cross_entropy(logits, labels_sb.contiguous())

    def _gather_vocab(self, logits: Tensor) -> Tensor:
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        if self.cfg.tensor_parallel_size == 1:
            return logits
        return gather_from_tensor_model_parallel_region(logits)

    def _vocab_log_softmax(self, logits: Tensor) -> Tensor:
        """log_softmax over a vocab split across tensor-parallel ranks."""
        import torch.distributed as dist

        from .parallel import all_reduce_sum, tp_group

        m = logits.detach().amax(dim=-1, keepdim=True)
        if self.cfg.tensor_parallel_size > 1:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group())
        z = all_reduce_sum((logits - m).exp().sum(dim=-1, keepdim=True))
        return logits - m - z.log()

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype activations flow in: that of the (non-router) parameters."""
        return next(self.block.parameters()).dtype

    def _pass(self, u: Tensor, freqs: Tensor, latent=None) -> Tensor:
        """One pass of the shared stack; ``freqs`` broadcastable to [s, b, 1, head_dim];
        ``latent``: the :class:`LatentPass` of a packed latent pass (it rides in Megatron's
        ``packed_seq_params``, so a recomputed layer sees it again in backward)."""
        return self.block(u, attention_mask=None, rotary_pos_emb=freqs, packed_seq_params=latent)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor | None = None,
        loss_mask: Tensor | None = None,
        return_logits: bool = False,
    ) -> ModelOutput:
        """Run the configured method. ``input_ids`` and ``labels`` are [b, s].

        Pipeline parallel (``model.pipeline_parallel_size > 1``): every stage calls this with the
        same batch; it runs the forward through the stages (``model/pipeline.py``) and every
        stage gets the last stage's results (detached: train through
        :func:`alcot.model.pipeline.run_pipeline`)."""
        if self.pp > 1:
            from .pipeline import forward_only

            return forward_only(self, input_ids, labels, loss_mask, return_logits)
        out, _ = self._run_local(input_ids, labels, loss_mask, return_logits)
        return out

    def latent_forward(
        self,
        input_ids: Tensor,
        labels: Tensor | None = None,
        loss_mask: Tensor | None = None,
        return_logits: bool = False,
        keep_states: bool = False,
        keep_cache: int = 0,
    ) -> tuple[ModelOutput, LatentTrace]:
        """Adaptive / fixed latent CoT with pruning (also vanilla when ``l_max == 0``), or
        Mixture-of-Recursions with its own routing.

        ``keep_states`` returns every step's hidden states in the trace (for diagnostics).
        ``keep_cache = n`` keeps the KV caches in ``self.kv`` afterwards, with room for ``n``
        more tokens to decode. One process only (pipeline stages run through ``pipeline.py``).
        """
        if self.pp > 1:
            raise RuntimeError("latent_forward runs in one pipeline stage; use model(...)")
        cfg = self.cfg
        if cfg.method not in ("adaptive", "fixed", "mor", "vanilla"):
            raise ValueError(f"latent_forward does not run method {cfg.method!r}")
        return self._run_local(
            input_ids, labels, loss_mask, return_logits, keep_states, keep_cache, latent=True
        )

    # The forward of every method is written once, as a *program*: a generator that runs where
    # the head is (the last pipeline stage, or the only process) and yields one
    # :class:`PassRequest` per traversal of the stack (which tokens, which step, and what the
    # first stage should feed in), receiving the traversal's output. In one process
    # :meth:`_run_local` answers each request at once; under pipeline parallelism
    # ``pipeline.py`` carries the request and the activations through the stages. Both run the
    # same arithmetic, which is what lets the tests require P = 2 to equal P = 1.

    def _run_local(
        self,
        input_ids: Tensor,
        labels: Tensor | None,
        loss_mask: Tensor | None,
        return_logits: bool,
        keep_states: bool = False,
        keep_cache: int = 0,
        latent: bool = False,
    ) -> tuple[ModelOutput, LatentTrace | None]:
        mb = self.micro(input_ids, keep_cache)
        program = self.program(mb, labels, loss_mask, return_logits, keep_states, latent)
        req = next(program)
        try:
            while True:
                x = self.stage_input(mb, req)
                req = program.send(self.stage_pass(mb, req, x))
        except StopIteration as stop:
            result = stop.value
        finally:
            self.kv = mb.kv if keep_cache else None  # autograd holds what backward needs
        return result

    def micro(self, input_ids: Tensor, keep_cache: int = 0) -> Micro:
        """The per-forward context of one micro-batch on this stage: rotary angles, the latent
        caches of this stage's layers, and (first stage) the scaled token embeddings."""
        b, s = input_ids.shape
        self.state.start_causal()
        mb = Micro(b, s, input_ids.device, self._rope(s), input_ids)
        if self.cfg.method in ("adaptive", "fixed", "mor", "vanilla"):
            mb.kv = LatentKV(
                b,
                s + keep_cache,
                1 + self.cfg.l_max,
                input_ids.device,
                attention_kernel(self.cfg),
                same_step=self.cfg.method == "mor",
                keep=keep_cache > 0,
                seq=s,
            )
        if self.first:
            mb.emb = self._embed(input_ids)
        return mb

    def program(self, mb, labels, loss_mask, return_logits, keep_states=False, latent=False):
        """The method's program (see above); it returns ``(ModelOutput, LatentTrace | None)``."""
        method = self.cfg.method
        if method == "mor":
            return self._mor_program(mb, labels, loss_mask, return_logits, keep_states)
        # adaptive with l_max = 0 has no decision to make (w(0) = 1): it is vanilla, and runs
        # vanilla's pass rather than the latent machinery (test_l_max_zero_equals_vanilla)
        if (method in ("adaptive", "fixed") and self.cfg.l_max > 0) or latent:
            return self._latent_program(mb, labels, loss_mask, return_logits, keep_states)
        return self._causal_program(mb, labels, loss_mask, return_logits)

    def first_request(self, mb: Micro) -> PassRequest:
        """Step 0 of every method: all tokens (the program yields the same request)."""
        if self.cfg.method in ("adaptive", "fixed", "mor") and self.cfg.l_max > 0:
            rows, pos = _all_tokens(mb.b, mb.s, mb.device)
            return PassRequest(0, "packed", rows, pos, width=mb.s)
        return PassRequest(0, "pause" if self.cfg.method == "pause" else "causal")

    def stage_input(self, mb: Micro, req: PassRequest) -> Tensor:
        """First stage: the input of a traversal from the request's feed (the embeddings at
        step 0; PonderLM adds the expected embedding of the fed distribution)."""
        if req.kind == "packed":
            return mb.emb[req.pos, req.rows][:, None] if req.feed is None else req.feed
        if req.kind == "pause":
            return self._pause_sequence(mb.emb)
        if req.step == 0:
            mb.u = mb.emb
            return mb.emb
        if self.cfg.method == "ponder":
            # the published recurrence accumulates: u <- u + E[p]; "reset" adds only the latest
            # expected embedding to the token's own
            base = mb.u if self.cfg.ponder_update == "accumulate" else mb.emb
            mb.u = base + self._embed_distribution(req.feed)
            return mb.u
        return req.feed

    def stage_pass(self, mb: Micro, req: PassRequest, x: Tensor):
        """This stage's layers over one traversal's input; returns (output, LatentPass)."""
        if req.kind == "packed":
            last = req.step == self.cfg.l_max and not mb.kv.keep  # nothing reads its keys
            p = mb.kv.plan(req.rows, req.pos, req.width, req.step, last)
            return self._pass(x, mb.rope[req.pos][:, None, None, :], p), p
        if req.kind == "pause":
            pos = torch.arange(mb.s, device=mb.device).repeat_interleave(self.cfg.l_max + 1)
            return self._pass(x, mb.rope[pos][:, None, None, :]), None
        return self._pass(x, mb.rope[:, None, None, :]), None

    def _pause_sequence(self, emb: Tensor) -> Tensor:
        """K pause tokens after every token, same position id: [s (K + 1), b, h]."""
        s, b, h = emb.shape
        k = self.cfg.l_max
        pauses = self._scale(self.pause.to(emb.dtype))[None, :, None, :].expand(s, k, b, h)
        return torch.cat([emb[:, None], pauses], dim=1).reshape(s * (k + 1), b, h)

    def _causal_program(self, mb, labels, loss_mask, return_logits):
        """Vanilla, looped, pause and PonderLM: full causal passes over every token."""
        method = self.cfg.method
        tally = FlopTally(self.cfg, grad=torch.is_grad_enabled())
        b, s = mb.b, mb.s
        passes = 1 + self.cfg.l_max
        if method == "pause":
            k = self.cfg.l_max
            out, _ = yield PassRequest(0, "pause")
            tally.block(s * (k + 1) * b, causal_pairs(s * (k + 1), b))
            h = out.reshape(s, k + 1, b, out.shape[-1])[:, k]  # predict from the last pause
        else:
            h, _ = yield PassRequest(0, "causal")
            tally.block(b * s, causal_pairs(s, b))
            for step in range(1, self.cfg.l_max + 1):  # looped / ponder (vanilla: l_max = 0)
                feed = self._distribution(h, tally) if method == "ponder" else h
                h, _ = yield PassRequest(step, "causal", feed=feed)
                tally.block(b * s, causal_pairs(s, b))
        depth = torch.full((b, s), self.cfg.l_max, dtype=torch.long, device=mb.device)
        logits = self._logits(h)
        tally.head(b * s)
        ce = adapt = loss = None
        if labels is not None:
            mask = _token_mask(labels, loss_mask)
            ce_tok = self._ce(logits, labels.t(), keep_logits=return_logits).t()
            ce = (ce_tok * mask).sum() / mask.sum().clamp_min(1.0)
            adapt = torch.zeros_like(ce)
            loss = ce
        flops = self._flops(tally, float(b * s * passes), b * s)
        lg = self._gather_vocab(logits).transpose(0, 1) if return_logits else None
        return ModelOutput(loss, ce, adapt, lg, depth, flops), None

    def _distribution(self, h: Tensor, tally: FlopTally) -> Tensor:
        """PonderLM, last stage: softmax(W h) over the (tensor-parallel) vocab, in the
        embedding's dtype, for the first stage to turn into an expected embedding."""
        s, b, _ = h.shape
        probs = self._vocab_log_softmax(self._logits(h)).exp()
        tally.head(s * b)
        tally.expected_embedding(s * b)
        return probs.to(self.compute_dtype)

    def _embed_distribution(self, probs: Tensor) -> Tensor:
        """PonderLM, first stage: s * sum_v p_v E_v (vocab split across tensor-parallel
        ranks)."""
        from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

        e = probs @ self.embedding.weight
        if self.cfg.tensor_parallel_size > 1:
            e = reduce_from_tensor_model_parallel_region(e)
        return self._scale(e)

    def _expected_embedding(self, h: Tensor, tally: FlopTally) -> Tensor:
        """PonderLM: sum_v softmax(W h)_v E_v (vocab split across tensor-parallel ranks)."""
        return self._embed_distribution(self._distribution(h, tally))

    def _flops(self, tally: FlopTally, executed_passes: float, tokens: int) -> Flops:
        return Flops(
            {
                "nominal": nominal_flops(self.cfg, executed_passes),
                "paper": paper_flops(self.cfg, executed_passes),
                "realised": tally.realised,
                "kernel": tally.kernel,
                "realised_matmul": tally.matmul,
                "realised_attention": tally.attention,
                "realised_forward": tally.forward,
                "realised_head": tally.parts.get("head", 0.0),
                "tokens": float(tokens),
                "executed_passes": executed_passes,
            }
        )

    # ------------------------------------------------------------------ latent steps
    def _latent_program(self, mb, labels, loss_mask, return_logits, keep_states):
        """Adaptive / fixed latent CoT with pruning: step k runs the tokens still active,
        packed; the router, halting, mixing and losses run here (the last stage)."""
        cfg = self.cfg
        b, s, dev = mb.b, mb.s, mb.device
        tally = FlopTally(cfg, grad=torch.is_grad_enabled())
        want_q = (
            labels is not None and self.router is not None and cfg.halting.loss in ("gate", "reach")
        )
        want_ce = labels is not None and cfg.mix == "distribution"
        dist_logits = cfg.mix == "distribution" and return_logits
        token_mask = _token_mask(labels, loss_mask) if labels is not None else None

        h_in = None  # the previous step's states [s, b, h] (step 0's input is the embedding)
        active = torch.ones(b, s, dtype=torch.bool, device=dev)
        r = torch.ones(b, s, device=dev)
        ran: list[Tensor] = []
        records: list[StepRecord] = []
        states: list[Tensor] = []
        mixed = None
        executed = 0
        rows, pos = _all_tokens(b, s, dev)
        width, changed, q_pending = s, False, False
        for k in range(cfg.l_max + 1):
            if changed:  # the one host read of a latent step: tokens per row
                n, width, rows, pos = _pack(active)
                if n == 0:
                    break
            n = rows.numel()
            if q_pending:
                # sg(q) of step k-1 is read for the tokens that continued: those packed now
                records[k - 1].q = self._correct_prob(
                    h_in, rows, pos, token_mask, labels, tally, loss_mask is not None
                )
                q_pending = False
            executed += n
            ran.append(active)
            feed = None if k == 0 else h_in[pos, rows][:, None]  # [N, 1, h]
            out, lp_ = yield PassRequest(k, "packed", rows, pos, feed, width)
            out = out[:, 0]  # [N, h]
            tally.block(n, lp_.pairs, lp_.kernel_pairs)
            h_k = out.new_zeros(s, b, out.shape[-1]).index_put((pos, rows), out)
            if keep_states:
                states.append(h_k)
            last = k == cfg.l_max
            g = None
            if self.router is not None and not last:
                g = r.new_zeros(b, s).index_put((rows, pos), self.router(out, k))
                floor = gate_floor(cfg.halting, self._progress())
                if floor > 0:  # the router's warm-up: g <- f + (1 - f) g
                    g = floor + (1.0 - floor) * g
                tally.router(n)
            weight, cont, r_next = halting_update(r, active, g, last, cfg.halting.tau)
            changed = cont is not active  # without a router every token continues
            q = ce_k = None
            if cfg.mix == "distribution" and (want_ce or dist_logits):
                lg = self._logits(out[:, None])  # [N, 1, V/tp]: part of the output, with grad
                tally.head(n)
                if labels is not None:
                    ce_n = self._ce(lg, labels[rows, pos][:, None], keep_logits=dist_logits)
                    ce_k = r.new_zeros(b, s).index_put((rows, pos), ce_n[:, 0])
                    q = (-ce_k.detach()).exp()
                if dist_logits:
                    lp = self._vocab_log_softmax(lg[:, 0])
                    lp = lp.new_zeros(s, b, lp.shape[-1]).index_put((pos, rows), lp)
                    term = log_weight(weight).t()[..., None] + lp
                    mixed = term if mixed is None else torch.logaddexp(mixed, term)
            elif want_q and not last:
                q = torch.ones(b, s, device=dev)  # filled in by the next step, if any
                q_pending = True
            records.append(StepRecord(weight, active, cont, g, r_next, q, ce_k))
            if cfg.mix == "state":  # mixed in fp32, whatever the activations' dtype
                contrib = weight.t()[..., None] * h_k.float()
                mixed = contrib if mixed is None else mixed + contrib
            r = r_next
            h_in = h_k
            active = cont

        depth = (
            torch.stack(ran[1:], 0).sum(0)
            if len(ran) > 1
            else (torch.zeros(b, s, dtype=torch.long, device=dev))
        )
        ce = adapt = loss = logits = None
        if cfg.mix == "state":
            lg = self._logits(mixed.to(self.compute_dtype))
            tally.head(b * s)
            if labels is not None:
                ce_tok = self._ce(lg, labels.t(), keep_logits=return_logits).t()
            if return_logits:
                logits = self._gather_vocab(lg).transpose(0, 1)
        else:
            if labels is not None:
                # -log sum_k w(k) softmax(W h(k))[y] = -logsumexp_k(log w(k) - ce(k))
                terms = torch.stack([log_weight(rec.weight) - rec.ce for rec in records], 0)
                ce_tok = -torch.logsumexp(terms, dim=0)
            if return_logits:
                logits = self._gather_vocab(mixed).transpose(0, 1)
        if labels is not None:
            ce = (ce_tok * token_mask).sum() / token_mask.sum().clamp_min(1.0)
            if self.router is not None:
                adapt = adaptive_loss(records, cfg, token_mask)
            else:
                adapt = torch.zeros_like(ce)
            loss = ce + self.halting_lambda() * adapt
        flops = self._flops(tally, float(executed), b * s)
        return ModelOutput(loss, ce, adapt, logits, depth, flops), LatentTrace(ran, states, records)

    def _mor_program(self, mb, labels, loss_mask, return_logits, keep_states):
        """Mixture-of-Recursions (``model/mor.py``): step 0 for every token, then recursion k
        for the tokens its router keeps among those that ran step k-1, each pass packed like a
        latent step, attending to its own step's cache only (recursion-wise KV caching).
        Training routes by expert choice (top-k per sequence); ``eval()`` by the causal
        threshold rule. The routers and the state H live here (the last stage)."""
        cfg, mc = self.cfg, self.cfg.mor
        b, s, dev = mb.b, mb.s, mb.device
        tally = FlopTally(cfg, grad=torch.is_grad_enabled())
        caps = mc.capacities(cfg.l_max)
        state = None  # [s, b, h]: H(k) of every token (H(0) = f(embedding), all tokens run)
        active = torch.ones(b, s, dtype=torch.bool, device=dev)
        ran: list[Tensor] = []
        states: list[Tensor] = []
        aux = torch.zeros((), device=dev)
        executed = 0
        rows, pos = _all_tokens(b, s, dev)
        width = s
        for k in range(cfg.l_max + 1):
            logit = None
            if k > 0:  # eligible: the tokens that ran step k-1 (packed as rows, pos)
                logit = state.new_zeros(b, s, dtype=torch.float32).index_put(
                    (rows, pos), self.mor_router(state[pos, rows], k)
                )
                tally.router(rows.numel())
                kept = select(logit, active, caps[k - 1], self.training, mc.threshold)
                aux = aux + aux_loss(logit, active, kept)
                active = kept
                n, width, rows, pos = _pack(active)  # the one host read of a step
                if n == 0:
                    break
            n = rows.numel()
            executed += n
            ran.append(active)
            u = None if k == 0 else state[pos, rows]  # [N, h]
            feed = None if k == 0 else u[:, None]
            out, lp_ = yield PassRequest(k, "packed", rows, pos, feed, width)
            tally.block(n, lp_.pairs, lp_.kernel_pairs)
            if k == 0:
                state = out.new_zeros(s, b, out.shape[-1]).index_put((pos, rows), out[:, 0])
            else:
                new = recursion_update(u, out[:, 0], logit[rows, pos], mc.alpha)
                state = state.index_put((pos, rows), new.to(state.dtype))
            if keep_states:
                states.append(state)

        depth = (
            torch.stack(ran[1:], 0).sum(0)
            if len(ran) > 1
            else torch.zeros_like(ran[0], dtype=torch.long)
        )
        lg = self._logits(state)
        tally.head(b * s)
        ce = adapt = loss = logits = None
        if labels is not None:
            token_mask = _token_mask(labels, loss_mask)
            ce_tok = self._ce(lg, labels.t(), keep_logits=return_logits).t()
            ce = (ce_tok * token_mask).sum() / token_mask.sum().clamp_min(1.0)
            adapt = aux
            loss = ce + mc.aux_weight * aux
        if return_logits:
            logits = self._gather_vocab(lg).transpose(0, 1)
        flops = self._flops(tally, float(executed), b * s)
        return ModelOutput(loss, ce, adapt, logits, depth, flops), LatentTrace(ran, states)

    def _correct_prob(
        self,
        h: Tensor,
        rows: Tensor,
        pos: Tensor,
        token_mask: Tensor,
        labels: Tensor,
        tally: FlopTally,
        masked: bool = False,
    ) -> Tensor:
        """sg(q_t(k)[y_t]) [b, s] from the step-k states ``h`` [s, b, h] for the tokens at
        (``rows``, ``pos``) (those that continue past step k) inside the loss mask, 1 elsewhere.

        The adaptive loss reads it only for those tokens, so the full-vocabulary head runs for
        them alone (at 70m it would otherwise be about 45 % of a latent step's cost), without a
        graph (a stop-gradient quantity), and in chunks of tokens: never [tokens x vocab] fp32
        logits at once (:data:`Q_CHUNK_ELEMENTS`). ``masked``: a loss mask was given, so the
        tokens outside it are dropped first (one more host read; the trainer gives none).
        """
        ce = torch.zeros(token_mask.shape, device=h.device)
        if masked:
            keep = (token_mask[rows, pos] > 0).nonzero()[:, 0]
            rows, pos = rows[keep], pos[keep]
        n = rows.numel()
        if n:
            chunk = max(1, Q_CHUNK_ELEMENTS // self.cfg.vocab_size)
            parts = []
            with torch.no_grad():
                x = h.detach()[pos, rows][:, None]  # [n, 1, h]
                y = labels[rows, pos][:, None]
                for i in range(0, n, chunk):
                    lg = self._logits(x[i : i + chunk])  # [c, 1, V/tp]
                    parts.append(self._ce(lg, y[i : i + chunk])[:, 0].float())
            tally.head(n, grad=False)
            ce_n = torch.cat(parts) if len(parts) > 1 else parts[0]
            ce = ce.index_put((rows, pos), ce_n)
        return (-ce).exp()

    def _packed_pass(
        self,
        u: Tensor,
        rows: Tensor,
        pos: Tensor,
        width: int,
        step: int,
        rope: Tensor,
        valid: Tensor | None = None,
    ):
        """Latent step ``step`` for the packed tokens ``u`` [N, 1, h] at (``rows``, ``pos``),
        at most ``width`` of them per row.

        Returns the outputs [N, 1, h] and the pass's :class:`LatentPass` (its ``pairs`` are the
        (query, key) pairs attended to, ``kernel_pairs`` those the kernel computes).
        """
        last = step == self.cfg.l_max and not self.kv.keep
        p = self.kv.plan(rows, pos, width, step, last, valid)
        freqs = rope[pos][:, None, None, :]  # [N, 1, 1, d]
        return self._pass(u, freqs, p), p


# elements of fp32 logits that sg(q) computes at once (64 Mi: 256 MB)
Q_CHUNK_ELEMENTS = 2**26


def _all_tokens(b: int, s: int, device) -> tuple[Tensor, Tensor]:
    """(rows, positions) of every token of a [b, s] batch, row-major, without a device read."""
    rows = torch.arange(b, device=device).repeat_interleave(s)
    return rows, torch.arange(s, device=device).repeat(b)


def _pack(active: Tensor) -> tuple[int, int, Tensor, Tensor]:
    """(N, most per row, rows, positions) of the ``active`` [b, s] tokens, row-major.

    One host read (the tokens per row, which fix the shapes of the pass); the indices come
    from ``nonzero_static`` with that size, which does not synchronise again."""
    counts = active.sum(1).tolist()
    n = sum(counts)
    idx = torch.nonzero_static(active, size=n)
    return n, max(counts), idx[:, 0], idx[:, 1]


def log_weight(w: Tensor) -> Tensor:
    """log w with -inf where w == 0, without NaN gradients."""
    safe = torch.where(w > 0, w, torch.ones_like(w))
    return torch.where(w > 0, safe.log(), torch.full_like(w, float("-inf")))


def _token_mask(labels: Tensor, loss_mask: Tensor | None) -> Tensor:
    if loss_mask is None:
        return torch.ones(labels.shape, dtype=torch.float32, device=labels.device)
    return loss_mask.float()
