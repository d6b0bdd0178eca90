"""The transformer layer spec, chosen in one place, and the core attention that makes latent steps
cheap.

Megatron's ``SelfAttention`` computes Q, K, V with its parallel linears and applies rotary
embeddings, then hands ``(query, key, value)`` to a pluggable *core attention* module. That hook
is all the method needs: :class:`LatentCoreAttention` writes this pass's keys and values into a
per-(layer, step) cache and attends over the caches of steps ``0..k`` with the 2-D mask, so earlier
steps are never recomputed. Which tokens the pass runs, and the mask, are decided by the model
and handed over through a shared :class:`AttentionState` (Megatron's attention signature has no
slot for them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import ModelConfig


class AttentionState:
    """What every layer's core attention needs to know about the current pass.

    ``mode == "causal"``: ordinary causal self-attention over this pass's own keys (vanilla,
    looped, pause, PonderLM).

    ``mode == "packed"`` (latent steps, the efficient path): the pass runs only the tokens
    executing latent step ``step``, packed row after row into one [N, 1, h] sequence, so that
    every matmul costs exactly the executed tokens. ``counts[r]`` of them belong to batch row r.
    Their keys/values are appended to the per-row caches of (layer, step), which hold only
    executed tokens; ``masks[r]`` ([n_q, n_k], True = may attend) lets a query at position t see
    the cached keys of steps 0..step at positions <= t. Decoding appends to the same caches.

    ``mode == "dense"`` (the naive test reference): every token runs every step in [s, b]
    layout; keys of all steps are concatenated and ``dense_mask`` ([b, 1, s, (step+1) s]) hides
    what was not executed.

    ``same_step`` (Mixture-of-Recursions' recursion-wise KV caching): a step-k query attends to
    the step-k caches only, not to those of steps 0..k; in dense mode ``dense_mask`` is then
    [b, 1, s, s].
    """

    def __init__(self):
        self.start_causal()

    def start_causal(self) -> None:
        self.mode = "causal"
        self.same_step = False
        self.kv: dict[tuple[int, int], tuple[list[Tensor], list[Tensor]]] = {}
        self.step = 0
        self.counts: list[int] = []
        self.masks: list[Tensor | None] = []
        self.key_pos: list[list[Tensor]] = []  # per step, per row: positions of cached keys
        self.dense_mask: Tensor | None = None

    def start_packed(self, same_step: bool = False) -> None:
        self.start_causal()
        self.mode = "packed"
        self.same_step = same_step

    def start_dense(self, same_step: bool = False) -> None:
        self.start_causal()
        self.mode = "dense"
        self.same_step = same_step

    def visible_steps(self) -> range:
        """The steps whose caches the current step's queries attend to."""
        return range(self.step, self.step + 1) if self.same_step else range(self.step + 1)

    def add_positions(self, step: int, pos: Tensor) -> list[Tensor]:
        """Record the positions of this pass's tokens (packed by row); returns them per row."""
        rows = list(torch.split(pos, self.counts))
        if step == len(self.key_pos):
            self.key_pos.append(rows)
        else:
            old = self.key_pos[step]
            pairs = zip(old, rows, strict=True)
            self.key_pos[step] = [torch.cat([o, n]) if len(n) else o for o, n in pairs]
        return rows

    def append(self, layer: int, key: Tensor, value: Tensor) -> None:
        """Append this pass's keys/values ([N, 1, ng, hn], packed by row) to the caches."""
        slot = (layer, self.step)
        ks = torch.split(key[:, 0], self.counts)
        vs = torch.split(value[:, 0], self.counts)
        if slot not in self.kv:
            self.kv[slot] = (list(ks), list(vs))
            return
        k_rows, v_rows = self.kv[slot]
        for r, n in enumerate(self.counts):
            if n:
                k_rows[r] = torch.cat([k_rows[r], ks[r]])
                v_rows[r] = torch.cat([v_rows[r], vs[r]])


class LatentCoreAttention(torch.nn.Module):
    """Scaled dot-product attention for the causal, packed-latent and dense-latent passes.

    Uses ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels
    where the device has them). Megatron calls it with ``query`` [sq, b, np, hn] and ``key`` /
    ``value`` [sq, b, ng, hn] (local heads under tensor parallelism) and expects
    [sq, b, np * hn] back.
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

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
        """q [b, np, sq, hn], k/v [b, ng, sk, hn] -> [b, np, sq, hn]."""
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=causal,
            scale=self.scale,
            enable_gqa=k.shape[1] != q.shape[1],
        )

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
        st = self.state
        sq, b, n_heads, hn = query.shape
        if st.mode == "packed":
            return self._packed(query, key, value)
        if st.mode == "dense":
            st.kv[(self.layer, st.step)] = ([key], [value])
            key = torch.cat([st.kv[(self.layer, j)][0][0] for j in st.visible_steps()])
            value = torch.cat([st.kv[(self.layer, j)][1][0] for j in st.visible_steps()])
            mask, causal = st.dense_mask, False
        else:
            mask, causal = None, True
        out = self._sdpa(
            query.permute(1, 2, 0, 3),
            key.permute(1, 2, 0, 3),
            value.permute(1, 2, 0, 3),
            mask,
            causal,
        )
        return out.permute(2, 0, 1, 3).reshape(sq, b, n_heads * hn)

    def _packed(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        st = self.state
        n_heads, hn = query.shape[2], query.shape[3]
        st.append(self.layer, key, value)
        caches = [st.kv[(self.layer, j)] for j in st.visible_steps()]
        outs, offset = [], 0
        for r, n in enumerate(st.counts):
            if n == 0:
                continue
            q = query[offset : offset + n, 0].transpose(0, 1)[None]  # [1, np, n, hn]
            offset += n
            if len(caches) == 1:
                k, v = caches[0][0][r], caches[0][1][r]
            else:
                k = torch.cat([c[0][r] for c in caches])
                v = torch.cat([c[1][r] for c in caches])
            mask = st.masks[r]
            o = self._sdpa(
                q,
                k.transpose(0, 1)[None],
                v.transpose(0, 1)[None],
                None if mask is None else mask[None, None],
                mask is None,
            )
            outs.append(o[0].transpose(0, 1).reshape(n, n_heads * hn))
        return torch.cat(outs)[:, None]


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


def build_block_spec(cfg: ModelConfig, state: AttentionState):
    """Megatron ``TransformerBlockSubmodules`` for a Llama block with our core attention.

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
    from megatron.core.transformer.transformer_layer import (
        TransformerLayer,
        TransformerLayerSubmodules,
    )

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
        module=TransformerLayer,
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
    return TransformerBlockSubmodules(layer_specs=[layer] * cfg.num_layers, layer_norm=final_norm)


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
        sequence_parallel=False,
        use_cpu_initialization=True,
        perform_initialization=True,
        init_method=init,
        output_layer_init_method=out_init,
        init_method_std=cfg.init_std,
        params_dtype=params_dtype,
    )


def _normal_init(std: float):
    def init_(tensor: Tensor) -> Tensor:
        return torch.nn.init.normal_(tensor, mean=0.0, std=std)

    return init_
