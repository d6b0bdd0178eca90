"""Tensor-parallel-independent weights: gather shards into full tensors and shard them back.

Megatron marks each sharded parameter with ``tensor_model_parallel``, ``partition_dim`` and
``partition_stride`` (SwiGLU's fused gate/up projection uses stride 2: each rank holds its slice of
the gate and its slice of the up projection). A full tensor is split along ``partition_dim`` into
``stride * world`` chunks and rank r keeps chunks ``r, r + world, ...`` — the same rule Megatron
uses when it initialises weights on the CPU, so a checkpoint written at one tensor-parallel size
loads exactly at another.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _is_sharded(p: torch.Tensor) -> bool:
    return bool(getattr(p, "tensor_model_parallel", False))


def _shard(full: torch.Tensor, dim: int, stride: int, rank: int, world: int) -> torch.Tensor:
    chunks = torch.chunk(full, stride * world, dim=dim)
    return torch.cat(chunks[rank::world], dim=dim)


def _unshard(parts: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    world = len(parts)
    per_rank = [torch.chunk(p, stride, dim=dim) for p in parts]
    ordered = [per_rank[r][j] for j in range(stride) for r in range(world)]
    return torch.cat(ordered, dim=dim)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of every parameter and buffer with tensor-parallel shards gathered.

    Megatron's linears also report an ``_extra_state`` entry (None without TransformerEngine);
    non-tensor entries pass through unchanged."""
    from .parallel import tp_group, tp_world_size

    world = tp_world_size()
    params = dict(model.named_parameters())
    out = {}
    for name, t in model.state_dict().items():
        p = params.get(name)
        if p is not None and _is_sharded(p) and world > 1:
            parts = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(parts, t.contiguous(), group=tp_group())
            t = _unshard(parts, p.partition_dim, p.partition_stride)
        out[name] = t.detach().cpu().clone() if isinstance(t, torch.Tensor) else t
    return out


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load full tensors, keeping this rank's shard of each sharded parameter."""
    from .parallel import tp_rank, tp_world_size

    world, rank = tp_world_size(), tp_rank()
    params = dict(model.named_parameters())
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise KeyError(f"state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    local = {}
    for name, t in state.items():
        p = params.get(name)
        if p is not None and _is_sharded(p) and world > 1:
            t = _shard(t, p.partition_dim, p.partition_stride, rank, world)
        if isinstance(t, torch.Tensor) and t.shape != own[name].shape:
            raise ValueError(
                f"{name}: checkpoint shape {tuple(t.shape)} != model {tuple(own[name].shape)}"
            )
        local[name] = t
    model.load_state_dict(local, strict=True)
