"""Process groups for Megatron-Core's parallel layers.

Megatron's layers look their tensor-parallel group up in ``parallel_state``, so it must be set
up before a model is built, even in a single CPU process. :func:`init_parallel` does that
idempotently: it starts a one-process gloo group on 127.0.0.1 when nothing launched us (tests,
the CLI on a laptop) and reuses the group a launcher (``torchrun``, Ray) already created.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

from .compat import ensure_cpu_compat


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_parallel(
    tensor_parallel_size: int = 1, backend: str | None = None, pipeline_parallel_size: int = 1
) -> None:
    """Initialise torch.distributed (if needed) and Megatron's model-parallel groups
    (tensor x pipeline; the remaining factor of the world is data parallel)."""
    ensure_cpu_compat()
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
        else:
            # A private rendezvous address, not MASTER_ADDR/PORT in the environment: child
            # processes (a launched run, a second trainer) must not inherit a bound port.
            dist.init_process_group(
                backend or "gloo",
                init_method=f"tcp://127.0.0.1:{_free_port()}",
                rank=0,
                world_size=1,
            )
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    world = dist.get_world_size()
    if world % (tensor_parallel_size * pipeline_parallel_size):
        raise ValueError(
            f"{world} processes cannot hold tensor_parallel_size={tensor_parallel_size} x "
            f"pipeline_parallel_size={pipeline_parallel_size}"
        )
    if ps.model_parallel_is_initialized():
        current = (
            ps.get_tensor_model_parallel_world_size(),
            ps.get_pipeline_model_parallel_world_size(),
        )
        if current == (tensor_parallel_size, pipeline_parallel_size):
            return
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel_size,
        pipeline_model_parallel_size=pipeline_parallel_size,
    )


def tp_group():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group()


def tp_world_size() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_world_size()


def pp_world_size() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_world_size()


def pp_rank() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_rank()


def pp_group():
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_group()


def tp_rank() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank()


class _AllReduceSum(torch.autograd.Function):
    """Sum over the tensor-parallel group, with a summing backward too.

    Megatron's ``reduce_from_tensor_model_parallel_region`` has an identity backward, which is
    right when what consumes the sum is replicated on every rank. A softmax normaliser over a
    vocab split across ranks is consumed by each rank's *own* shard, so the gradient reaching it
    is partial on every rank and must be summed as well.
    """

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x, group=tp_group())
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=tp_group())
        return grad


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Differentiable sum over the tensor-parallel group (see :class:`_AllReduceSum`)."""
    if tp_world_size() == 1:
        return x
    return _AllReduceSum.apply(x)
