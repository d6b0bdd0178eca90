"""Resume a training checkpoint at another (tensor, pipeline) layout.

A checkpoint holds one file per model-parallel rank (``tp<t>.pt``, or ``tp<t>_pp<p>.pt`` under
pipeline parallelism): the rank's model shard under global names (layer indices of the whole
model, ``tp_reshard.global_name``), its fp32 main weights and AdamW state keyed by the same
names, and the layout it was written at. Resuming at the same layout reads the rank's own file.
At another layout every rank reads all files, rebuilds the full tensors it needs (tensor-parallel
shards joined with Megatron's ``partition_dim`` / ``partition_stride`` rule, pipeline stages by
name), and cuts its own shards: weights, main weights and both Adam moments, so the next step is
the step the old layout would have taken.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .checkpoints import CheckpointInfo
from .tp_reshard import _is_sharded, _shard, _unshard

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
            if p is not None and _is_sharded(p) and old_tp > 1:
                return _unshard(parts, p.partition_dim, p.partition_stride)
            return parts[0]
        return None

    def cut(name: str, t: torch.Tensor) -> torch.Tensor:
        p = params.get(name)
        if p is not None and _is_sharded(p) and tp_size > 1:
            return _shard(t, p.partition_dim, p.partition_stride, tp_rank, tp_size)
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


def full_model_state(path: Path, model) -> dict:
    """A checkpoint's model weights as full tensors under one-process names (for a model built
    at tensor and pipeline size 1: evaluation, export, MLflow models)."""
    tp, pp, files = saved_layout(path)
    stages = [
        [
            torch.load(files[(t, p)], map_location="cpu", weights_only=True)["model"]
            for t in range(tp)
        ]
        for p in range(pp)
    ]
    params = dict(model.named_parameters())
    full = {}
    for states in stages:
        for name, t in states[0].items():
            p = params.get(name)
            if isinstance(t, torch.Tensor) and p is not None and _is_sharded(p) and tp > 1:
                full[name] = _unshard(
                    [s[name] for s in states], p.partition_dim, p.partition_stride
                )
            else:
                full.setdefault(name, t)
    return full
