"""FLOPs accounting: the nominal figure, the paper's convention, and the compute actually spent.

*Nominal* (Kaplan-style): ``6 * N * tokens * passes`` with N the non-embedding parameters and
``passes`` the executed passes per token (1 + latent depth).

*Paper* (the convention of the paper's FLOPs table): ``6 * N_total * tokens * passes`` with
N_total every parameter, embeddings and LM head included. Its vanilla 1.4B on 26B tokens is
6 x 1.4e9 x 26e9 = 2.18e20; nominal gives 1.89e20 for ``1.4b``. Use it to compare with the
paper's numbers; use realised to compare methods.

*Realised*: the model tallies, while it runs, the matmul FLOPs of the tokens each pass actually
executed (QKV, attention output, SwiGLU, router, LM head, PonderLM's expected embedding) plus
attention over the (query, key) pairs the mask actually allows. A multiply-add counts 2 FLOPs.
*Kernel* FLOPs count, beside them, the attention work the chosen kernel executes, masked pairs
included (padding of the packed latent batch, cache slots a query may not see): the difference
is kernel overhead, not the method's cost.
Work done under autograd is counted three times (forward, grad-input, grad-weight); work done
without grad (e.g. the stop-gradient probabilities of the adaptive loss) once. Padding rows that
the pruned passes carry for batching are *not* counted: they are overhead, not the method's cost.

No public trainer counts realised FLOPs for data-dependent depth, so this is tested against
``torch.utils.flop_counter.FlopCounterMode`` on models where the two must agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import ModelConfig, count_parameters


class Flops(dict):
    """A forward's FLOPs counters. Values that depend on the data (attention pairs of pruned
    passes) may be 0-dim device tensors, so that counting them does not stop the device: item
    access (``flops["realised"]``) reads them as floats, :meth:`raw` does not (the trainer sums
    the raw values and reads them once per ``log_every``)."""

    def __getitem__(self, key: str) -> float:
        return _as_float(super().__getitem__(key))

    def get(self, key, default=None):
        if key not in self:
            return default
        return self[key]

    def raw(self, key: str):
        return super().__getitem__(key)

    def resolved(self) -> dict[str, float]:
        """A plain dict of floats (one read per device value)."""
        return {k: self[k] for k in self}


def _as_float(v) -> float:
    return float(v.item()) if hasattr(v, "item") and not isinstance(v, float) else float(v)


def layer_matmul_flops_per_token(cfg: ModelConfig) -> int:
    """Forward matmul FLOPs of one transformer layer for one token (excluding attention)."""
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    return 2 * (h * (h + 2 * cfg.kv_dim) + h * h + 3 * h * f)


@dataclass
class FlopTally:
    """Accumulates realised FLOPs during one forward. ``grad`` decides the backward factor."""

    cfg: ModelConfig
    grad: bool
    matmul: float = 0.0
    attention: float = 0.0
    kernel_attention: float = 0.0
    forward: float = 0.0
    parts: dict = field(default_factory=dict)

    def _add(self, name: str, fwd: float, grad: bool | None = None) -> None:
        factor = 3 if (self.grad if grad is None else grad) else 1
        self.forward += fwd
        self.parts[name] = self.parts.get(name, 0.0) + fwd * factor
        if name == "attention":
            self.attention += fwd * factor
        else:
            self.matmul += fwd * factor

    def block(self, tokens: int, attended_pairs: int, kernel_pairs: int | None = None) -> None:
        """One pass of the whole stack over ``tokens`` queries with ``attended_pairs`` (q, k);
        ``kernel_pairs``: the pairs the attention kernel computes (default: the same). Pairs
        may be 0-dim device tensors: they are summed on the device, never read here."""
        cfg = self.cfg
        self._add("layers", float(cfg.num_layers * layer_matmul_flops_per_token(cfg) * tokens))
        # QK^T and AV: 2 FLOPs per multiply-add, head_dim per head, all query heads.
        qk_av = 2 * 2 * cfg.num_attention_heads * cfg.head_dim
        self._add("attention", _scaled(attended_pairs, cfg.num_layers * qk_av))
        kp = attended_pairs if kernel_pairs is None else kernel_pairs
        factor = 3 if self.grad else 1
        self.kernel_attention += _scaled(kp, cfg.num_layers * qk_av) * factor

    def head(self, tokens: int, grad: bool | None = None) -> None:
        self._add("head", float(2 * self.cfg.hidden_size * self.cfg.vocab_size * tokens), grad)

    def router(self, tokens: int) -> None:
        h = self.cfg.hidden_size
        per = 2 * (h * h + h) if self.cfg.halting.router == "mlp" else 2 * h
        self._add("router", float(per * tokens))

    def expected_embedding(self, tokens: int) -> None:
        self._add(
            "ponder_embedding", float(2 * self.cfg.vocab_size * self.cfg.hidden_size * tokens)
        )

    @property
    def realised(self) -> float:
        return self.matmul + self.attention

    @property
    def kernel(self) -> float:
        """Realised FLOPs with the attention the kernel executes in place of the attended pairs."""
        return self.matmul + self.kernel_attention


def _scaled(count, factor: int):
    """``factor * count`` as a float, or as a float64 device tensor when ``count`` is one."""
    if hasattr(count, "double"):
        return count.double() * factor
    return float(factor * count)


def nominal_flops(cfg: ModelConfig, executed_passes: float) -> float:
    """6 * N * (sum over tokens of executed passes)."""
    return 6.0 * count_parameters(cfg)["non_embedding"] * float(executed_passes)


def paper_flops(cfg: ModelConfig, executed_passes: float) -> float:
    """6 * N_total * (sum over tokens of executed passes): the paper's convention."""
    return 6.0 * count_parameters(cfg)["total"] * float(executed_passes)


def causal_pairs(length: int, batch: int) -> int:
    """(query, key) pairs a causal pass over ``length`` tokens attends to."""
    return batch * length * (length + 1) // 2
