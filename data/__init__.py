"""alcot.data: document sources, the built-in corpus, BPE tokenizers, cached token files
(Megatron-Core ``IndexedDataset`` shards) and the loaders. Knows nothing of Ray or MLflow.

Names are imported on first use, so that the tokenizer worker processes
(``alcot.data.tokenize_worker``) start without torch."""

from alcot.common import megatron_cpu

megatron_cpu.install()  # Megatron's datasets import all of megatron.core (see that module)

__all__ = ["DataConfig", "PackedLoader", "PreparedData", "prepare"]


def __getattr__(name):
    if name == "DataConfig":
        from .config import DataConfig

        return DataConfig
    if name == "PackedLoader":
        from .loader import PackedLoader

        return PackedLoader
    if name in ("PreparedData", "prepare"):
        from . import preparation

        return getattr(preparation, name)
    raise AttributeError(name)
