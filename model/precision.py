"""Reduced precision the way Megatron runs it: bf16 parameters, fp32 main weights and gradients.

Why not autocast: Megatron-Core's parallel linears are custom autograd functions that CPU
autocast does not cast for (a bf16 activation meets an fp32 weight), and Megatron itself never
trains under autocast: its ``Float16Module`` holds the model in bf16 and its optimizer keeps an
fp32 *main* copy of every parameter, accumulates gradients into fp32 *main grads*, steps in fp32
and copies the result back. This module does the same on any device, so the bf16 path runs (and
is tested) on CPU exactly as on a GPU.

What stays fp32: the router and Mixture-of-Recursions' routers (small, and the halting decisions
must not flip with rounding), the rotary tables, and everything the model computes from logits
(the head's output is cast to fp32 before softmax, cross entropy and the adaptive losses; reach,
gates, exit weights and the state mixing are fp32 tensors; see ``model/network.py``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

# Megatron's tensor-parallel attributes, carried over to the main copies (clipping reads them)
_TP_ATTRS = ("tensor_model_parallel", "partition_dim", "partition_stride")


def fp32_module_names(model) -> tuple[str, ...]:
    """Submodules whose parameters stay fp32 under bf16."""
    return tuple(n for n in ("router", "mor_router") if getattr(model, n, None) is not None)


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the parameters to ``dtype`` in place, except the routers (buffers are left alone:
    the rotary inverse frequencies stay fp32)."""
    keep = fp32_module_names(model)
    for name, p in model.named_parameters():
        if name.split(".")[0] in keep:
            continue
        p.data = p.data.to(dtype)
    return model


class MainParams:
    """fp32 main copies of a model's reduced-precision parameters and their gradients.

    Every backward call's gradient of a bf16 parameter is added into its fp32 main gradient as
    soon as autograd has produced it (a post-accumulate-grad hook, as Megatron's DDP does into
    ``main_grad``), and the bf16 one is freed: accumulation over micro-batches, and over the
    separate backward calls of the pipeline schedule's slots (a parameter gets one per latent
    step and micro-batch there), never rounds a running sum to bf16. :meth:`accumulate` moves
    whatever a hook did not (gradients set by hand). The optimizer steps the main parameters;
    :meth:`copy_to_model` rounds them back into the model. fp32 parameters are their own main
    copy.
    """

    def __init__(self, params: list[nn.Parameter], hooks: bool = True):
        self.pairs: list[tuple[nn.Parameter, nn.Parameter]] = []
        for p in params:
            if p.dtype == torch.float32:
                main = p
            else:
                main = nn.Parameter(p.detach().float(), requires_grad=p.requires_grad)
                for attr in _TP_ATTRS:
                    if hasattr(p, attr):
                        setattr(main, attr, getattr(p, attr))
            self.pairs.append((p, main))
        self.main = {id(p): m for p, m in self.pairs}
        if hooks:
            for p, m in self.pairs:
                if p is not m and p.requires_grad:
                    p.register_post_accumulate_grad_hook(self._to_main)

    def _to_main(self, p: nn.Parameter) -> None:
        m = self.main[id(p)]
        g = p.grad.float()
        m.grad = g if m.grad is None else m.grad.add_(g)
        p.grad = None

    @property
    def reduced(self) -> bool:
        """Whether any parameter has a separate main copy."""
        return any(p is not m for p, m in self.pairs)

    def main_of(self, p: nn.Parameter) -> nn.Parameter:
        return self.main[id(p)]

    def params(self) -> list[nn.Parameter]:
        return [m for _, m in self.pairs]

    def accumulate(self) -> None:
        for p, m in self.pairs:
            if p is not m and p.grad is not None:
                self._to_main(p)

    def all_reduce_mean(self, group, world: int) -> None:
        """Average the main gradients over a data-parallel group (one flat fp32 all-reduce;
        a parameter that got no gradient on a rank counts as zero there)."""
        grads = []
        for _, m in self.pairs:
            if m.grad is None:
                m.grad = torch.zeros_like(m)
            grads.append(m.grad)
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        flat /= world
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for p, m in self.pairs:
            if p is not m:
                p.copy_(m)

    def state_dict(self) -> list[torch.Tensor]:
        """The main copies that differ from the model's parameters (empty in fp32)."""
        return [m.detach().clone() for p, m in self.pairs if p is not m]

    @torch.no_grad()
    def load_state_dict(self, saved: list[torch.Tensor] | None) -> None:
        """Restore main copies saved by :meth:`state_dict`; without them (a checkpoint written
        in fp32) the main copies start from the model's parameters."""
        separate = [(p, m) for p, m in self.pairs if p is not m]
        if saved is None:
            for p, m in separate:
                m.copy_(p.float())
            return
        if len(saved) != len(separate):
            raise ValueError(
                f"checkpoint has {len(saved)} fp32 main parameters, the model {len(separate)}"
            )
        for (_, m), t in zip(separate, saved, strict=True):
            m.copy_(t)
