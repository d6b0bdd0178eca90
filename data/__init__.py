"""alcot.data: document sources, the built-in corpus, BPE tokenizers, cached token files and the
packed-sequence loader. Knows nothing of Ray or MLflow."""

from .config import DataConfig
from .loader import PackedLoader
from .prepare import PreparedData, prepare

__all__ = ["DataConfig", "PackedLoader", "PreparedData", "prepare"]
