"""alcot.model: the Llama decoder with adaptive latent chain-of-thought, baselines, FLOPs and
generation. Knows nothing of Ray or MLflow."""

import warnings

# Megatron-Core announces at import that optional fused kernels (TransformerEngine, apex) are
# missing and that it falls back to plain torch; that is the expected state on CPU.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=".*full scope is deprecated.*")
warnings.filterwarnings("ignore", message=".*tp_group is None.*", category=DeprecationWarning)
warnings.filterwarnings("ignore", message=".*MLP requires ffn_hidden_size.*")

from alcot.common import megatron_cpu  # noqa: E402
from alcot.common.typed import ConfigError  # noqa: E402

megatron_cpu.install()  # on a host without CUDA, Megatron's unused fusions are not compiled

from .config import LADDER, HaltingConfig, ModelConfig, count_parameters  # noqa: E402

__all__ = [
    "LADDER",
    "AlcotModel",
    "ConfigError",
    "HaltingConfig",
    "ModelConfig",
    "ModelOutput",
    "count_parameters",
    "init_parallel",
]


def __getattr__(name):
    # The network imports Megatron-Core, and the process groups torch: load them only when a
    # model is actually needed, so that config validation, the CLI, a sweep's driver and the
    # analysis (which read the configs and the LADDER) start without torch.
    if name in ("AlcotModel", "ModelOutput"):
        from . import network

        return getattr(network, name)
    if name == "init_parallel":
        from .parallel import init_parallel

        return init_parallel
    raise AttributeError(name)
