"""Typed, validated model configuration and the size ladder.

Every choice that ``shared/METHOD.md`` marks **[open]** is a field here with the stated default, so
a sweep can compare readings. Validation happens on construction: a bad value raises
:class:`ConfigError` naming the dotted field, before any weights exist.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from alcot.common.typed import ConfigError, build, to_dict

METHODS = ("adaptive", "vanilla", "looped", "pause", "ponder", "fixed", "mor")
ROUTERS = ("linear", "per_step", "mlp", "none")
ADAPT_LOSSES = ("gate", "reach", "act", "pondernet")
MIXES = ("state", "distribution")
SPECS = ("auto", "local", "te")
ATTENTION_KERNELS = ("auto", "sdpa", "flex")
RECOMPUTE = ("none", "full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")
ROUTER_INITS = ("normal", "zero")
PONDER_UPDATES = ("accumulate", "reset")


# The size ladder. Shapes follow the Pythia family that METHOD.md's 70M/410M/1.4B models come
# from (Llama-style blocks: RMSNorm, SwiGLU, RoPE, untied head). Parameter counts are never typed
# in: :func:`count_parameters` derives them from these shapes.
LADDER: dict[str, dict[str, int]] = {
    # pico and nano: below micro in width only, so that a CPU study can train three sizes to
    # about 20 tokens per parameter (docs/study/README.md)
    "pico": dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=2048),
    "nano": dict(num_layers=2, hidden_size=48, num_attention_heads=4, vocab_size=2048),
    "micro": dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=2048),
    "tiny": dict(num_layers=4, hidden_size=128, num_attention_heads=4, vocab_size=2048),
    "mini": dict(num_layers=6, hidden_size=256, num_attention_heads=4, vocab_size=2048),
    "70m": dict(num_layers=6, hidden_size=512, num_attention_heads=8, vocab_size=50304),
    "160m": dict(num_layers=12, hidden_size=768, num_attention_heads=12, vocab_size=50304),
    "410m": dict(num_layers=24, hidden_size=1024, num_attention_heads=16, vocab_size=50304),
    "1.4b": dict(num_layers=24, hidden_size=2048, num_attention_heads=16, vocab_size=50304),
}


def swiglu_ffn_size(hidden_size: int, multiple_of: int = 64) -> int:
    """Llama's SwiGLU width: 2/3 of 4h (same parameters as a 4h GELU MLP), rounded up."""
    return multiple_of * math.ceil(int(8 * hidden_size / 3) / multiple_of)


@dataclass
class HaltingConfig:
    """Router, pruning and the adaptive loss (METHOD.md, "Router and halting" and "Losses")."""

    ALIASES: ClassVar[dict[str, str]] = {"lambda": "lambda_"}

    router: str = "linear"  # linear (one d->1 layer shared by all steps) | per_step | mlp | none
    tau: float = 0.1  # prune a token once its reach r_t(k) < tau  [open]
    lambda_: float = 0.01  # weight of the adaptive loss (YAML key: ``lambda``)
    beta: float = 1.0  # exponent on sg(q_t(k)[y_t]) in the correctness-aware loss
    loss: str = "gate"  # gate (default formula) | reach | act | pondernet  [open]
    # router bias starts at logit(init_continue). 0.5, not METHOD.md's 0.9: with 0.9 the
    # mixing weights put 73 % of each token on step 3 at the start, which left a 4-layer
    # model a lasting deficit (docs/study/router.md); with 0.5 every token starts at depth 3
    # (tau 0.1) with half its weight on step 0
    init_continue: float = 0.5
    prior: float = 0.5  # geometric prior's halting probability, for loss=pondernet
    # router weights: normal (std init_std; g spreads around init_continue: w . h has std
    # init_std sqrt(d) for post-norm h) | zero (every token starts exactly at init_continue)
    router_init: str = "normal"
    # True: the router reads sg(h(k)), so the adaptive loss trains the router only, never the
    # backbone (METHOD.md leaves open which); False: its gradient reaches the backbone too
    detach_router_input: bool = False
    # The router's warm-up (docs/study/router.md). For the first ``router_warmup_frac`` of
    # training the gate is floored, g <- f + (1 - f) g, with f falling linearly from
    # ``gate_floor`` to 0, so that tokens keep running latent steps while those states become
    # useful (a pruned token's weights do not depend on its gate: a router shut early gets no
    # gradient to re-open). Training only; evaluation and inference use the router as it is.
    gate_floor: float = 0.0
    router_warmup_frac: float = 0.0
    # lambda rises linearly from 0 over this fraction of training  [open]
    lambda_warmup_frac: float = 0.0
    # the router's learning rate as a multiple of train.lr (same schedule). 0.1: at the full
    # rate Adam moves every router weight by ~lr per step whatever the gradient's size, and the
    # CE shut the router of a 4-layer model within 40 steps (docs/study/router.md)
    router_lr_scale: float = 0.1

    @classmethod
    def from_dict(cls, d: dict[str, Any], prefix: str = "model.halting") -> HaltingConfig:
        return build(cls, d, prefix)

    def validate(self, prefix: str = "model.halting") -> None:
        if self.router not in ROUTERS:
            raise ConfigError(f"{prefix}.router", f"must be one of {ROUTERS}, got {self.router!r}")
        if not (0.0 < self.tau < 1.0):
            raise ConfigError(f"{prefix}.tau", f"must be in (0, 1), got {self.tau}")
        if self.lambda_ < 0:
            raise ConfigError(f"{prefix}.lambda", f"must be >= 0, got {self.lambda_}")
        if self.beta < 0:
            raise ConfigError(f"{prefix}.beta", f"must be >= 0, got {self.beta}")
        if self.loss not in ADAPT_LOSSES:
            raise ConfigError(f"{prefix}.loss", f"must be one of {ADAPT_LOSSES}, got {self.loss!r}")
        if not (0.0 < self.init_continue < 1.0):
            raise ConfigError(
                f"{prefix}.init_continue", f"must be in (0, 1), got {self.init_continue}"
            )
        if not (0.0 < self.prior < 1.0):
            raise ConfigError(f"{prefix}.prior", f"must be in (0, 1), got {self.prior}")
        if not (0.0 <= self.gate_floor < 1.0):
            raise ConfigError(f"{prefix}.gate_floor", f"must be in [0, 1), got {self.gate_floor}")
        for name in ("router_warmup_frac", "lambda_warmup_frac"):
            value = getattr(self, name)
            if not (0.0 <= value <= 1.0):
                raise ConfigError(f"{prefix}.{name}", f"must be in [0, 1], got {value}")
        if not (self.router_lr_scale >= 0):
            raise ConfigError(
                f"{prefix}.router_lr_scale", f"must be >= 0, got {self.router_lr_scale}"
            )
        if self.router_init not in ROUTER_INITS:
            raise ConfigError(
                f"{prefix}.router_init", f"must be one of {ROUTER_INITS}, got {self.router_init!r}"
            )


@dataclass
class MoRConfig:
    """Mixture-of-Recursions (Bae et al., 2025, arXiv 2507.10524), expert-choice routing.

    The shared stack is the recursion block (the paper's "cycle" sharing); step 0 is the ordinary
    pass of every token, and each latent step k = 1..l_max is a recursion that keeps a capacity
    of the sequence's tokens, chosen among those that ran step k-1 (hierarchical filtering).
    """

    # fraction of the sequence's tokens that step k = 1..l_max keeps (one value per step,
    # non-increasing). None = the paper's schedule: with N_r = l_max + 1 recursions, recursion r
    # keeps (N_r - r + 1) / N_r, so step k keeps (l_max + 1 - k) / (l_max + 1).
    capacity: list[float] | None = None
    alpha: float = 0.1  # selected tokens add alpha * g * f(h): the gate scale of the MoR code
    aux_weight: float = 0.001  # weight of the auxiliary BCE loss that makes the router causal
    threshold: float = 0.5  # at inference a token recurses iff sigmoid(router) >= threshold

    @classmethod
    def from_dict(cls, d: dict[str, Any], prefix: str = "model.mor") -> MoRConfig:
        return build(cls, d, prefix)

    def validate(self, l_max: int, prefix: str = "model.mor") -> None:
        if self.capacity is not None:
            if len(self.capacity) != l_max:
                raise ConfigError(
                    f"{prefix}.capacity",
                    f"needs one value per latent step (l_max = {l_max}), got {len(self.capacity)}",
                )
            for i, c in enumerate(self.capacity):
                if not (0.0 < c <= 1.0):
                    raise ConfigError(f"{prefix}.capacity[{i}]", f"must be in (0, 1], got {c}")
            if any(b > a for a, b in zip(self.capacity, self.capacity[1:], strict=False)):
                raise ConfigError(
                    f"{prefix}.capacity",
                    f"must not increase from step to step, got {self.capacity}",
                )
        if not (self.alpha > 0):
            raise ConfigError(f"{prefix}.alpha", f"must be > 0, got {self.alpha}")
        if self.aux_weight < 0:
            raise ConfigError(f"{prefix}.aux_weight", f"must be >= 0, got {self.aux_weight}")
        if not (0.0 < self.threshold < 1.0):
            raise ConfigError(f"{prefix}.threshold", f"must be in (0, 1), got {self.threshold}")

    def capacities(self, l_max: int) -> list[float]:
        """Capacity of each latent step 1..l_max."""
        if self.capacity is not None:
            return list(self.capacity)
        return [(l_max + 1 - k) / (l_max + 1) for k in range(1, l_max + 1)]


def default_embed_scale(hidden_size: int) -> float:
    """sqrt(2.5 d): METHOD.md's default input scale (PonderLM-2's), for every method."""
    return math.sqrt(2.5 * hidden_size)


@dataclass
class ModelConfig:
    """The network and the method.

    ``size`` picks shapes from :data:`LADDER`; any shape field given explicitly overrides the
    ladder (tests use this for very small models). ``method`` picks the model family:

    * ``adaptive``: latent steps with a learned router and pruning (the method under study)
    * ``vanilla``: a plain Llama (``l_max`` is forced to 0)
    * ``looped``: the whole stack applied ``1 + l_max`` times to every token
    * ``pause``: ``l_max`` learnable pause tokens after every token, predicting from the last
    * ``ponder``: PonderLM, ``l_max`` pondering steps feeding back the expected embedding
    * ``fixed``: latent CoT with the router off, every token runs ``l_max`` steps
    * ``mor``: Mixture-of-Recursions, expert-choice routers keep a capacity of tokens per step
    """

    size: str = "tiny"
    method: str = "adaptive"
    l_max: int = 3
    num_layers: int | None = None
    hidden_size: int | None = None
    num_attention_heads: int | None = None
    num_query_groups: int | None = None  # GQA; None = one group per head
    ffn_hidden_size: int | None = None  # None = Llama SwiGLU width from hidden_size
    vocab_size: int | None = None
    max_seq_len: int = 2048  # rotary table length; also the generation limit
    rotary_base: int = 10000
    norm_eps: float = 1e-5
    init_std: float = 0.02
    # s in u_t(0) = s * E[x_t]  [open]. None = sqrt(2.5 d) from the size, for every method (so
    # vanilla is compared fairly); a number overrides it. Pause vectors and PonderLM's expected
    # embedding are embeddings too and are scaled by the same s.
    embed_scale: float | None = None
    # PonderLM: accumulate (the published code: u <- u + E[p] at every pondering step) | reset
    # (u = s E[x] + E[p] of the latest step only; see docs/architecture.md)
    ponder_update: str = "accumulate"
    mix: str = "state"  # state: mix hidden states | distribution: mix softmaxes  [open]
    halting: HaltingConfig = field(default_factory=HaltingConfig)
    mor: MoRConfig = field(default_factory=MoRConfig)
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    spec: str = "auto"  # auto: TransformerEngine spec when CUDA + TE are present, else local
    # kernel of the latent passes' attention (model/layers.py: attention_kernel): auto = sdpa
    attention_kernel: str = "auto"
    # activation recompute, Megatron's: none | full (whole layers, recompute_method /
    # recompute_num_layers as in Megatron) | selective (core attention only)
    recompute: str = "none"
    recompute_method: str = "uniform"
    recompute_num_layers: int = 1

    def __post_init__(self):
        if isinstance(self.halting, dict):
            self.halting = HaltingConfig.from_dict(self.halting)
        if isinstance(self.mor, dict):
            self.mor = MoRConfig.from_dict(self.mor)
        if self.size not in LADDER:
            raise ConfigError("model.size", f"unknown size {self.size!r}; ladder: {list(LADDER)}")
        for key, value in LADDER[self.size].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = swiglu_ffn_size(self.hidden_size)
        if self.method == "vanilla":
            self.l_max = 0
        if self.embed_scale is None and isinstance(self.hidden_size, int):
            self.embed_scale = default_embed_scale(self.hidden_size)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        p = "model"
        if self.method not in METHODS:
            raise ConfigError(f"{p}.method", f"must be one of {METHODS}, got {self.method!r}")
        _int_field(self, "l_max", p, minimum=0)
        for name in (
            "num_layers",
            "hidden_size",
            "num_attention_heads",
            "num_query_groups",
            "ffn_hidden_size",
            "vocab_size",
            "max_seq_len",
            "tensor_parallel_size",
            "pipeline_parallel_size",
        ):
            _int_field(self, name, p, minimum=1)
        if self.method in ("looped", "pause", "ponder", "fixed", "mor") and self.l_max < 1:
            raise ConfigError(f"{p}.l_max", f"method {self.method!r} needs l_max >= 1")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"{p}.hidden_size",
                f"{self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}",
            )
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ConfigError(f"{p}.hidden_size", "head dimension must be even for rotary")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"{p}.num_query_groups",
                f"{self.num_query_groups} does not divide num_attention_heads "
                f"{self.num_attention_heads}",
            )
        tp = self.tensor_parallel_size
        for name in ("num_attention_heads", "num_query_groups", "vocab_size", "ffn_hidden_size"):
            if getattr(self, name) % tp:
                raise ConfigError(
                    f"{p}.tensor_parallel_size",
                    f"{tp} does not divide {name} = {getattr(self, name)}",
                )
        if self.num_layers % self.pipeline_parallel_size:
            raise ConfigError(
                f"{p}.pipeline_parallel_size",
                f"{self.pipeline_parallel_size} does not divide num_layers = {self.num_layers} "
                "(every stage holds the same number of layers)",
            )
        if self.mix not in MIXES:
            raise ConfigError(f"{p}.mix", f"must be one of {MIXES}, got {self.mix!r}")
        if self.spec not in SPECS:
            raise ConfigError(f"{p}.spec", f"must be one of {SPECS}, got {self.spec!r}")
        if self.attention_kernel not in ATTENTION_KERNELS:
            raise ConfigError(
                f"{p}.attention_kernel",
                f"must be one of {ATTENTION_KERNELS}, got {self.attention_kernel!r}",
            )
        if self.recompute not in RECOMPUTE:
            raise ConfigError(
                f"{p}.recompute", f"must be one of {RECOMPUTE}, got {self.recompute!r}"
            )
        if self.recompute_method not in RECOMPUTE_METHODS:
            raise ConfigError(
                f"{p}.recompute_method",
                f"must be one of {RECOMPUTE_METHODS}, got {self.recompute_method!r}",
            )
        _int_field(self, "recompute_num_layers", p, minimum=1)
        if self.recompute_num_layers > self.num_layers or (
            self.recompute_method == "uniform" and self.num_layers % self.recompute_num_layers
        ):
            raise ConfigError(
                f"{p}.recompute_num_layers",
                f"{self.recompute_num_layers} must be at most num_layers = {self.num_layers} "
                "(and divide it, with recompute_method uniform)",
            )
        if not (self.embed_scale > 0):
            raise ConfigError(f"{p}.embed_scale", f"must be > 0, got {self.embed_scale}")
        if self.ponder_update not in PONDER_UPDATES:
            raise ConfigError(
                f"{p}.ponder_update",
                f"must be one of {PONDER_UPDATES}, got {self.ponder_update!r}",
            )
        if self.norm_eps <= 0 or self.init_std <= 0:
            raise ConfigError(f"{p}.norm_eps", "norm_eps and init_std must be > 0")
        self.halting.validate(f"{p}.halting")
        if self.method == "mor":
            self.mor.validate(self.l_max, f"{p}.mor")

    # ------------------------------------------------------------------ derived
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_dim(self) -> int:
        return self.num_query_groups * self.head_dim

    @property
    def latent(self) -> bool:
        """True for the methods that run latent steps with the 2-D mask and KV reuse."""
        return self.method in ("adaptive", "fixed")

    @property
    def uses_router(self) -> bool:
        return self.method == "adaptive" and self.l_max > 0 and self.halting.router != "none"

    @property
    def planned_passes(self) -> float:
        """Passes per token a budget should plan for: 1 + l_max, except that Mixture-of-
        Recursions runs 1 + sum of its capacities (exact in training: top-k keeps a fixed count;
        adaptive halting can only be planned at its maximum)."""
        if self.method == "mor":
            return 1.0 + sum(self.mor.capacities(self.l_max))
        return float(1 + self.l_max)

    @property
    def extra_steps(self) -> int:
        """Extra passes per token beyond the ordinary one (K, or l_max)."""
        return self.l_max

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def canonical(self) -> ModelConfig:
        """The same model with every field that cannot affect it reset to its default.

        Halting settings only matter to ``adaptive`` (and state/distribution mixing only to the
        latent methods), so a sweep that crosses ``method`` with ``halting.lambda`` does not
        produce several identical vanilla trials: their canonical configs, and so their
        identities, are equal.
        """
        changes: dict[str, Any] = {}
        if not self.uses_router:
            changes["halting"] = HaltingConfig()
        if not self.latent:
            changes["mix"] = "state"
        if self.method != "ponder":
            changes["ponder_update"] = "accumulate"
        if self.method != "mor":
            changes["mor"] = MoRConfig()
        if self.recompute == "none":
            changes.update(recompute_method="uniform", recompute_num_layers=1)
        return dataclasses.replace(self, **changes) if changes else self

    @classmethod
    def from_dict(cls, d: dict[str, Any], prefix: str = "model") -> ModelConfig:
        """Build from a mapping, checking keys and types; errors name the dotted field."""
        return build(cls, d, prefix)


def _int_field(cfg, name: str, prefix: str, minimum: int) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{prefix}.{name}", f"must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{prefix}.{name}", f"must be >= {minimum}, got {value}")


def router_parameters(cfg: ModelConfig) -> int:
    if cfg.method == "mor":
        return cfg.l_max * (cfg.hidden_size + 1)  # one linear router per recursion step
    if not cfg.uses_router:
        return 0
    h = cfg.hidden_size
    if cfg.halting.router == "linear":
        return h + 1
    if cfg.halting.router == "per_step":
        return cfg.l_max * (h + 1)
    return h * h + h + h + 1  # mlp: d -> d (SiLU) -> 1


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts derived from the shapes (all tensor-parallel ranks together).

    ``non_embedding`` is Kaplan's N: everything except the token embedding and the untied LM
    head. It is what the nominal FLOPs figure 6 * N * D uses. Pause vectors are input embeddings
    (one per pause position, looked up, never multiplied), so they count as embedding
    parameters. ``total`` is what the paper's FLOPs convention (6 * total * D) uses.
    """
    h, f, v = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size
    per_layer = (
        h  # input RMSNorm
        + h * (h + 2 * cfg.kv_dim)  # fused QKV
        + h * h  # attention output
        + h  # pre-MLP RMSNorm
        + h * 2 * f  # SwiGLU gate and up
        + f * h  # down
    )
    blocks = cfg.num_layers * per_layer + h  # + final norm
    extra = router_parameters(cfg)
    embedding = v * h + (cfg.l_max * h if cfg.method == "pause" else 0)
    head = v * h
    non_embedding = blocks + extra
    return {
        "total": non_embedding + embedding + head,
        "non_embedding": non_embedding,
        "embedding": embedding,
        "head": head,
        "router": router_parameters(cfg),
    }


@dataclass
class TrainerConfig:
    """The ``train:`` section. ``batch_size`` is sequences per optimizer step (all ranks)."""

    steps: int = 200
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of lr
    warmup_frac: float = 0.02
    # A warm-up of this many optimizer steps instead of warmup_frac x steps (0: use the
    # fraction). A study whose arms train for different lengths warms each up alike.
    warmup_steps: int = 0
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 4
    log_every: int = 1
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16: bf16 parameters and activations with fp32
    # main weights, gradient accumulation and optimizer (model/precision.py)
    precision: str = "auto"
    resume: str = "auto"  # auto: continue from the newest valid checkpoint in out_dir | never
    threads: int = 0  # torch CPU threads; 0 = torch's default

    def __post_init__(self):
        for name in (
            "steps",
            "batch_size",
            "grad_accum",
            "eval_every",
            "eval_batches",
            "log_every",
            "checkpoint_every",
            "keep_checkpoints",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}", f"must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                "train.grad_accum",
                f"{self.grad_accum} does not divide batch_size {self.batch_size}",
            )
        if self.lr <= 0:
            raise ConfigError("train.lr", f"must be > 0, got {self.lr}")
        if not (0.0 <= self.min_lr_ratio <= 1.0):
            raise ConfigError("train.min_lr_ratio", "must be in [0, 1]")
        if not (0.0 <= self.warmup_frac < 1.0):
            raise ConfigError("train.warmup_frac", "must be in [0, 1)")
        if self.warmup_steps < 0:
            raise ConfigError("train.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError("train.precision", "must be auto, fp32 or bf16")
        if self.resume not in ("auto", "never"):
            raise ConfigError("train.resume", "must be auto or never")
        if self.grad_clip < 0:
            raise ConfigError("train.grad_clip", "must be >= 0 (0 disables clipping)")

    @classmethod
    def from_dict(cls, d: dict[str, Any], prefix: str = "train") -> TrainerConfig:
        return build(cls, d, prefix)
