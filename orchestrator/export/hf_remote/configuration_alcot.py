"""Configuration of an alcot model exported for Hugging Face transformers (remote code)."""

from transformers import PretrainedConfig


class AlcotConfig(PretrainedConfig):
    model_type = "alcot"

    def __init__(
        self,
        method: str = "adaptive",
        l_max: int = 3,
        vocab_size: int = 2048,
        hidden_size: int = 128,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 4,
        intermediate_size: int = 384,
        max_position_embeddings: int = 2048,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-5,
        embed_scale: float = 1.0,
        mix: str = "state",
        router: str = "linear",
        tau: float = 0.1,
        context_length: int = 128,
        ponder_update: str = "accumulate",
        mor_alpha: float = 0.1,
        mor_threshold: float = 0.5,
        eos_token_id: int = 0,
        pad_token_id: int = 0,
        **kwargs,
    ):
        self.method = method
        self.l_max = l_max
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.embed_scale = embed_scale
        self.mix = mix
        self.router = router
        self.tau = tau
        self.context_length = context_length
        self.ponder_update = ponder_update  # PonderLM: accumulate (published) | reset
        self.mor_alpha = mor_alpha  # Mixture-of-Recursions: h + alpha g f(h) for kept tokens
        self.mor_threshold = mor_threshold  # a token recurses iff sigmoid(router) >= this
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)
