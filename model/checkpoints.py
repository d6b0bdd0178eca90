"""Training checkpoints: atomic, checksummed, the last N kept, corrupt ones skipped.

``<out>/checkpoints/step_00000100/`` holds one ``tp<r>.pt`` per tensor-parallel rank
(``tp<r>_pp<p>.pt`` under pipeline parallelism) (model,
optimizer, scheduler, data position, RNG states, counters) and ``meta.json`` (step, checksums,
the caller's metadata such as the MLflow run id), written last. A checkpoint is first written to
a hidden temporary folder and renamed into place, so a crash or SIGKILL at any moment leaves
either the complete checkpoint or none. Loading verifies every checksum; a corrupt or truncated
newest checkpoint is reported and the previous one is used.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from alcot.common.files import file_sha256, fsync_dir

if TYPE_CHECKING:
    import torch

# torch is imported where a checkpoint is written or loaded: finding and verifying checkpoints
# (meta.json and checksums) is what a sweep's driver does, and it runs without torch.

PREFIX = "step_"


@dataclass
class CheckpointInfo:
    path: Path
    step: int
    meta: dict


def _ranks() -> tuple[int, int, int, int, int]:
    """(global rank, tensor-parallel rank, data-parallel rank, pipeline rank, pipeline size)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        return 0, 0, 0, 0, 1
    return (
        dist.get_rank(),
        ps.get_tensor_model_parallel_rank(),
        ps.get_data_parallel_rank(),
        ps.get_pipeline_model_parallel_rank(),
        ps.get_pipeline_model_parallel_world_size(),
    )


def save(ckpt_dir: Path, step: int, payload: dict, meta: dict, keep: int) -> Path:
    """Write this rank's ``payload``; data-parallel replicas other than rank 0 write nothing."""
    import torch
    import torch.distributed as dist

    rank, tp_rank, dp_rank, pp_rank, pp_size = _ranks()
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    name = f"{PREFIX}{step:08d}"
    tmp = ckpt_dir / f".{name}.tmp"
    final = ckpt_dir / name
    if rank == 0 and tmp.exists():
        shutil.rmtree(tmp)
    if dist.is_initialized():
        dist.barrier()
    if dp_rank == 0:
        tmp.mkdir(parents=True, exist_ok=True)
        target = tmp / (f"tp{tp_rank}.pt" if pp_size == 1 else f"tp{tp_rank}_pp{pp_rank}.pt")
        with open(target, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        files = {p.name: file_sha256(p) for p in sorted(tmp.glob("tp*.pt"))}
        body = {"step": step, "files": files, "meta": meta}
        with open(tmp / "meta.json", "w") as f:
            json.dump(body, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # e.g. a corrupt checkpoint of the same step from an earlier attempt
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(ckpt_dir)
        _prune(ckpt_dir, keep)
    if dist.is_initialized():
        dist.barrier()
    return final


def _prune(ckpt_dir: Path, keep: int) -> None:
    steps = sorted(_candidates(ckpt_dir), key=lambda p: p[0])
    for _, path in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


def _candidates(ckpt_dir: Path) -> list[tuple[int, Path]]:
    out = []
    if not ckpt_dir.exists():
        return out
    for p in ckpt_dir.iterdir():
        if p.is_dir() and p.name.startswith(PREFIX):
            try:
                out.append((int(p.name[len(PREFIX) :]), p))
            except ValueError:
                continue
    return out


def verify(path: Path) -> CheckpointInfo:
    """Raise ``ValueError`` unless every file listed in meta.json is present and intact."""
    try:
        body = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable meta.json ({err})") from None
    files = body.get("files") or {}
    if not files:
        raise ValueError(f"{path}: meta.json lists no files")
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            raise ValueError(f"{path}: missing {name}")
        if file_sha256(f) != digest:
            raise ValueError(f"{path}: checksum mismatch in {name} (corrupt or truncated)")
    return CheckpointInfo(path=path, step=int(body["step"]), meta=body.get("meta", {}))


def latest_valid(ckpt_dir: Path) -> CheckpointInfo | None:
    """The newest checkpoint that verifies; warns about each newer one that does not."""
    for _, path in sorted(_candidates(ckpt_dir), key=lambda p: p[0], reverse=True):
        try:
            return verify(path)
        except ValueError as err:
            warnings.warn(
                f"skipping checkpoint: {err}; falling back to an earlier one", stacklevel=2
            )
    return None


def load_payload(info: CheckpointInfo, device: torch.device) -> dict:
    """This rank's file (the trainer reshards checkpoints of another layout: layouts.py)."""
    import torch

    _, tp_rank, _, pp_rank, pp_size = _ranks()
    name = f"tp{tp_rank}.pt" if pp_size == 1 else f"tp{tp_rank}_pp{pp_rank}.pt"
    return torch.load(info.path / name, map_location=device, weights_only=True)
