"""Shared fixtures. One process imports Megatron-Core once (it costs seconds per process), and
one single-rank gloo group serves every model test."""

from __future__ import annotations

import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=".*full scope is deprecated.*")


@pytest.fixture(scope="session")
def parallel():
    from alcot.model import init_parallel

    init_parallel(1)
    return True


def tiny_config(**overrides):
    """A very small model so that every test runs in well under a second."""
    from alcot.model import ModelConfig

    base = dict(
        size="tiny",
        method="adaptive",
        l_max=3,
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=128,
    )
    base.update(overrides)
    return ModelConfig.from_dict(base)


@pytest.fixture
def build(parallel):
    """build(seed=0, **config overrides) -> AlcotModel."""
    from alcot.model import AlcotModel

    def _build(seed: int = 0, **overrides):
        torch.manual_seed(seed)
        return AlcotModel(tiny_config(**overrides))

    return _build


def spread_router(model, std: float = 0.3, seed: int = 1) -> None:
    """Give the router enough spread that tokens halt at different depths."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.router.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
