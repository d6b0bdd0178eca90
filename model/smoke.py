"""A self-contained training smoke run: a tiny model learns a synthetic corpus in seconds.

It needs no data files, so a fresh install can prove that the model trains end to end. The corpus
is a fixed random token sequence read at random offsets: memorisable, so the loss must fall fast.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .config import ModelConfig


@dataclass
class SmokeResult:
    first_loss: float
    last_loss: float
    mean_depth: float
    realised_flops: float
    seconds: float


def run_smoke(method: str = "adaptive", steps: int = 60, seed: int = 0, log=print) -> SmokeResult:
    from .network import AlcotModel
    from .parallel import init_parallel

    init_parallel(1)
    torch.manual_seed(seed)
    cfg = ModelConfig(
        size="tiny",
        method=method,
        l_max=2 if method != "vanilla" else 0,
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        vocab_size=256,
    )
    model = AlcotModel(cfg)
    gen = torch.Generator().manual_seed(seed)
    corpus = torch.randint(0, cfg.vocab_size, (512,), generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95))
    seq, batch = 32, 8
    start = time.perf_counter()
    first = last = None
    flops = 0.0
    for step in range(steps):
        offsets = torch.randint(0, len(corpus) - seq - 1, (batch,), generator=gen)
        window = torch.stack([corpus[o : o + seq + 1] for o in offsets])
        out = model(window[:, :-1], window[:, 1:])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        flops += out.flops["realised"]
        last = out.ce_loss.item()
        first = last if first is None else first
        if step % 10 == 0 or step == steps - 1:
            log(f"step {step:4d}  ce {last:.3f}  mean depth {out.mean_depth:.2f}")
    return SmokeResult(first, last, out.mean_depth, flops, time.perf_counter() - start)
