"""Checkpoint layouts: weights under any (tensor, pipeline) parallel layout, joined into full
tensors under one-process names and split back.

Tensor parallelism. Megatron marks each sharded parameter with ``tensor_model_parallel``,
``partition_dim`` and ``partition_stride`` (SwiGLU's fused gate/up projection uses stride 2: each
rank holds its slice of the gate and its slice of the up projection). A full tensor is split
along ``partition_dim`` into ``stride * world`` chunks and rank r keeps chunks ``r, r + world,
...`` (:func:`tp_split`, joined back by :func:`tp_join`) — the same rule Megatron uses when it
initialises weights on the CPU, so a checkpoint written at one tensor-parallel size loads exactly
at another. :func:`partitions` lists a model's rule as plain data (name -> dim, stride), for a
process that joins a checkpoint without the model (an MLflow model logged from a checkpoint).

Pipeline parallelism. Stages hold contiguous layers under local names (``block.layers.0`` is
the stage's first layer); :func:`global_name` maps them to the layer's global index (Megatron's
global ``layer_number``), so a full state dict has the same keys whatever the pipeline size.

Live models: :func:`full_state_dict` gathers a distributed model's weights on every rank,
:func:`load_full_state_dict` loads full weights into one.

Checkpoints. A checkpoint holds one file per model-parallel rank (``tp<t>.pt``, or
``tp<t>_pp<p>.pt`` under pipeline parallelism; :func:`rank_file`, :func:`saved_layout`): the
rank's model shard under global names, its fp32 main weights and AdamW state keyed by the same
names, and the layout it was written at. :func:`full_model_state` joins a checkpoint's weights
into one-process tensors (evaluation, export, MLflow models). :func:`load_resharded` resumes a
checkpoint at another layout: resuming at the same layout reads the rank's own file; at another
every rank reads all files, rebuilds the full tensors it needs (tensor-parallel shards joined,
pipeline stages by name), and cuts its own shards: weights, main weights and both Adam moments,
so the next step is the step the old layout would have taken.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .checkpoints import CheckpointInfo

Partitions = Mapping[str, tuple[int, int]]  # sharded parameter -> (partition_dim, stride)


def is_sharded(p: torch.Tensor) -> bool:
    """Whether Megatron shards ``p`` over the tensor-parallel ranks."""
    return bool(getattr(p, "tensor_model_parallel", False))


def partitions(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{global name: (partition_dim, partition_stride)}`` of the model's sharded parameters:
    how each is split over tensor-parallel ranks (the same at every tensor-parallel size)."""
    offset = layer_offset(model)
    return {
        global_name(n, offset): (int(p.partition_dim), int(p.partition_stride))
        for n, p in model.named_parameters()
        if is_sharded(p)
    }


def tp_split(full: torch.Tensor, dim: int, stride: int, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s shard of the full tensor ``full`` out of ``world`` (Megatron's rule)."""
    chunks = torch.chunk(full, stride * world, dim=dim)
    return torch.cat(chunks[rank::world], dim=dim)


def tp_join(parts: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """The full tensor of every tensor-parallel rank's shard (in rank order): undoes
    :func:`tp_split`."""
    world = len(parts)
    per_rank = [torch.chunk(p, stride, dim=dim) for p in parts]
    ordered = [per_rank[r][j] for j in range(stride) for r in range(world)]
    return torch.cat(ordered, dim=dim)


_LAYERS = "block.layers."


def layer_offset(model: nn.Module) -> int:
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
        if p is not None and is_sharded(p) and world > 1:
            parts = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(parts, t.contiguous(), group=tp_group())
            t = tp_join(parts, p.partition_dim, p.partition_stride)
        out[name] = t.detach().cpu().clone() if isinstance(t, torch.Tensor) else t
    offset = layer_offset(model)
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
    offset = layer_offset(model)
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
        if p is not None and is_sharded(p) and world > 1:
            t = tp_split(t, p.partition_dim, p.partition_stride, rank, world)
        if isinstance(t, torch.Tensor) and t.shape != own[name].shape:
            raise ValueError(
                f"{name}: checkpoint shape {tuple(t.shape)} != model {tuple(own[name].shape)}"
            )
        local[local_name(name, offset)] = t
    model.load_state_dict(local, strict=True)


# ------------------------------------------------------------------------------ checkpoints
_FILE = re.compile(r"^tp(\d+)(?:_pp(\d+))?\.pt$")


def rank_file(tp_rank: int, pp_rank: int, pp_size: int) -> str:
    return f"tp{tp_rank}.pt" if pp_size == 1 else f"tp{tp_rank}_pp{pp_rank}.pt"


def saved_layout(path: Path) -> tuple[int, int, dict[tuple[int, int], Path]]:
    """(tensor size, pipeline size, {(t, p): file}) of a checkpoint folder."""
    files = {}
    for f in Path(path).iterdir():
        m = _FILE.match(f.name)
        if m:
            files[(int(m.group(1)), int(m.group(2) or 0))] = f
    if not files:
        raise ValueError(f"{path}: no rank files")
    tp = 1 + max(t for t, _ in files)
    pp = 1 + max(p for _, p in files)
    if len(files) != tp * pp:
        raise ValueError(f"{path}: expected {tp * pp} rank files for tp={tp} x pp={pp}")
    return tp, pp, files


def named_state(opt_state: dict, names: list[str]) -> dict[str, dict]:
    """AdamW's per-index state keyed by parameter name."""
    return {names[i]: st for i, st in opt_state["state"].items()}


def load_resharded(
    info: CheckpointInfo,
    params: dict,
    keys: list[str],
    opt_template: dict,
    opt_names: list[str],
    main_names: list[str],
    tp_rank: int,
    tp_size: int,
    device,
) -> dict:
    """The payload this rank would have written at its layout, rebuilt from a checkpoint
    written at another. ``params``: this rank's parameters by global name (their
    tensor-parallel attributes say how to cut); ``keys``: its state dict's global names;
    ``opt_template``: this rank's optimizer
    ``state_dict()`` (its param groups and indices)."""
    old_tp, old_pp, files = saved_layout(info.path)
    loaded = {
        key: torch.load(f, map_location=device, weights_only=True) for key, f in files.items()
    }
    stages = [[loaded[(t, p)] for t in range(old_tp)] for p in range(old_pp)]

    def full(name: str, get) -> torch.Tensor | None:
        """The full tensor ``get(payload, name)`` over the old tensor-parallel shards."""
        for shards in stages:
            parts = [get(pl, name) for pl in shards]
            if parts[0] is None:
                continue
            p = params.get(name)
            if p is not None and is_sharded(p) and old_tp > 1:
                return tp_join(parts, p.partition_dim, p.partition_stride)
            return parts[0]
        return None

    def cut(name: str, t: torch.Tensor) -> torch.Tensor:
        p = params.get(name)
        if p is not None and is_sharded(p) and tp_size > 1:
            return tp_split(t, p.partition_dim, p.partition_stride, tp_rank, tp_size)
        return t

    def model_entry(pl, name):
        return pl["model"].get(name)

    first = stages[0][0]
    payload = {k: first[k] for k in ("scheduler", "data", "counters", "rng")}

    model = {}
    for name in params:
        t = full(name, model_entry)
        if t is None:
            raise KeyError(f"{info.path}: no weights for {name}")
        model[name] = cut(name, t)
    # buffers and extra state (rotary frequencies, Megatron's _extra_state) from any stage
    for shards in stages:
        for name, t in shards[0]["model"].items():
            if name in keys and name not in model:
                model[name] = t
    missing = sorted(set(keys) - set(model))
    if missing:
        raise KeyError(f"{info.path}: no entries for {missing[:5]}")
    payload["model"] = model

    def opt_entry(key):
        def get(pl, name):
            st = named_state(pl["optimizer"], pl["opt_names"]).get(name)
            return None if st is None else st[key]

        return get

    state = {}
    for i, name in enumerate(opt_names):
        st = {}
        for key in ("exp_avg", "exp_avg_sq"):
            t = full(name, opt_entry(key))
            if t is None:
                break
            st[key] = cut(name, t)
        if st:
            st["step"] = next(
                s for s in (opt_entry("step")(pl, name) for pl in loaded.values()) if s is not None
            )
            state[i] = st
    groups = []
    old_groups = first["optimizer"]["param_groups"]
    for g, old in zip(opt_template["param_groups"], old_groups, strict=True):
        groups.append({**old, "params": g["params"]})
    payload["optimizer"] = {"state": state, "param_groups": groups}

    if main_names:

        def main_entry(pl, name):
            if not pl.get("main_params"):
                return None
            return dict(zip(pl["main_names"], pl["main_params"], strict=True)).get(name)

        mains = [full(n, main_entry) for n in main_names]
        payload["main_params"] = (
            None
            if any(t is None for t in mains)
            else [cut(n, t) for n, t in zip(main_names, mains, strict=True)]
        )
    else:
        payload["main_params"] = None
    return payload


def full_model_state(path: Path, layout: nn.Module | Partitions) -> dict:
    """A checkpoint's model weights as full tensors under one-process names (for a model built
    at tensor and pipeline size 1: evaluation, export, MLflow models): tensor-parallel shards
    joined, pipeline stages (disjoint entries) merged. ``layout`` says how the sharded
    parameters were split: a model of the checkpoint's architecture (any layout; its
    parameters' attributes), or :func:`partitions` of one. A checkpoint without
    tensor-parallel shards needs none: ``{}``."""
    rules = partitions(layout) if isinstance(layout, nn.Module) else layout
    tp, pp, files = saved_layout(path)
    if tp > 1 and not rules:
        raise ValueError(f"{path} holds {tp} tensor-parallel shards but no rule to join them")
    stages = [
        [
            torch.load(files[(t, p)], map_location="cpu", weights_only=True)["model"]
            for t in range(tp)
        ]
        for p in range(pp)
    ]
    full = {}
    for states in stages:
        for name, t in states[0].items():
            rule = rules.get(name)
            if tp > 1 and rule is not None and isinstance(t, torch.Tensor):
                full[name] = tp_join([s[name] for s in states], *rule)
            else:
                full.setdefault(name, t)
    return full


_DISTRIBUTED_ENV = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def partitions_of(model_settings: Mapping) -> dict[str, tuple[int, int]]:
    """:func:`partitions` of the model that ``model_settings`` (a run config's ``model``
    mapping) describes, built at tensor and pipeline size 1 on the CPU in a fresh Python
    process: building a model needs Megatron's parallel state, which this process may hold at
    another layout (a tensor-parallel trainer logging its final model)."""
    env = {k: v for k, v in os.environ.items() if k not in _DISTRIBUTED_ENV}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run(
        [sys.executable, "-m", "alcot.model.layouts"],
        input=json.dumps(dict(model_settings)),
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    lines = out.stdout.strip().splitlines()
    if out.returncode or not lines:
        raise RuntimeError(
            f"building the model to read its tensor-parallel partitions failed: "
            f"{(out.stderr or out.stdout).strip()[-2000:]}"
        )
    return {name: (dim, stride) for name, (dim, stride) in json.loads(lines[-1]).items()}


def _print_partitions() -> None:
    """``python -m alcot.model.layouts``: model settings (JSON) on stdin, the model's
    :func:`partitions` as one JSON line on stdout."""
    from .config import ModelConfig
    from .network import AlcotModel
    from .parallel import init_parallel

    settings = json.loads(sys.stdin.read())
    cfg = ModelConfig.from_dict(
        {**settings, "tensor_parallel_size": 1, "pipeline_parallel_size": 1}
    )
    init_parallel(1)
    print(json.dumps(partitions(AlcotModel(cfg))))


if __name__ == "__main__":
    _print_partitions()
