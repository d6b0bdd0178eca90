"""Layout-independent weights: gather tensor-parallel shards and pipeline stages into full
tensors under one-process names, and shard them back for any (tensor, pipeline) layout.

Megatron marks each sharded parameter with ``tensor_model_parallel``, ``partition_dim`` and
``partition_stride`` (SwiGLU's fused gate/up projection uses stride 2: each rank holds its slice of
the gate and its slice of the up projection). A full tensor is split along ``partition_dim`` into
``stride * world`` chunks and rank r keeps chunks ``r, r + world, ...`` — the same rule Megatron
uses when it initialises weights on the CPU, so a checkpoint written at one tensor-parallel size
loads exactly at another. Pipeline stages hold contiguous layers under local names
(``block.layers.0`` is the stage's first layer); :func:`global_name` maps them to the layer's
global index (Megatron's global ``layer_number``), so a full state dict has the same keys
whatever the pipeline size.
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


_LAYERS = "block.layers."


def _layer_offset(model: nn.Module) -> int:
    layers = getattr(getattr(model, "block", None), "layers", None)
    if not layers:
        return 0
    return layers[0].layer_number - 1


def global_name(name: str, offset: int) -> str:
    """``block.layers.<local>.rest`` -> ``block.layers.<offset + local>.rest``."""
    if offset == 0 or not name.startswith(_LAYERS):
        return name
    local, rest = name[len(_LAYERS) :].split(".", 1)
    return f"{_LAYERS}{int(local) + offset}.{rest}"


def local_name(name: str, offset: int) -> str:
    if offset == 0 or not name.startswith(_LAYERS):
        return name
    glob, rest = name[len(_LAYERS) :].split(".", 1)
    return f"{_LAYERS}{int(glob) - offset}.{rest}"


def _pp_world() -> int:
    from .parallel import pp_world_size

    return pp_world_size() if dist.is_initialized() else 1


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of every parameter and buffer with tensor-parallel shards gathered and, under
    pipeline parallelism, every stage's entries (global layer names), on every rank.

    Megatron's linears also report an ``_extra_state`` entry (None without TransformerEngine);
    non-tensor entries pass through unchanged."""
    from .parallel import pp_group, tp_group, tp_world_size

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
    offset = _layer_offset(model)
    out = {global_name(n, offset): t for n, t in out.items()}
    if _pp_world() > 1:
        parts = [None] * _pp_world()
        dist.all_gather_object(parts, out, group=pp_group())
        out = {}
        for part in parts:
            out.update(part)
    return out


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load full tensors (one-process names), keeping this rank's shard of each sharded
    parameter and this pipeline stage's entries."""
    from .parallel import pp_group, tp_rank, tp_world_size

    world, rank = tp_world_size(), tp_rank()
    offset = _layer_offset(model)
    params = {global_name(n, offset): p for n, p in model.named_parameters()}
    own = {global_name(n, offset): t for n, t in model.state_dict().items()}
    every = set(own)
    if _pp_world() > 1:
        parts = [None] * _pp_world()
        dist.all_gather_object(parts, sorted(own), group=pp_group())
        every = set().union(*map(set, parts))
    missing = sorted(every - set(state))
    unexpected = sorted(set(state) - every)
    if missing or unexpected:
        raise KeyError(f"state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    local = {}
    for name, t in state.items():
        if name not in own:
            continue
        p = params.get(name)
        if p is not None and _is_sharded(p) and world > 1:
            t = _shard(t, p.partition_dim, p.partition_stride, rank, world)
        if isinstance(t, torch.Tensor) and t.shape != own[name].shape:
            raise ValueError(
                f"{name}: checkpoint shape {tuple(t.shape)} != model {tuple(own[name].shape)}"
            )
        local[local_name(name, offset)] = t
    model.load_state_dict(local, strict=True)
