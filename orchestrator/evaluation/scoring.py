"""Scoring continuations (log-likelihoods of candidate endings) with a loaded run, counting
the latent passes and FLOPs the scoring spent (``Stats``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from alcot.orchestrator.evaluation.loading import LoadedRun


@dataclass
class Stats:
    """What the forwards of one budget cost: realised inference FLOPs over positions run."""

    flops: float = 0.0
    positions: int = 0
    depth: list[int] = field(default_factory=list)  # histogram of executed latent steps

    def add(self, out, valid: torch.Tensor | None = None) -> None:
        self.flops += float(out.flops["realised"])
        self.positions += int(out.flops["tokens"])
        d = out.depth if valid is None else out.depth[valid]
        hist = torch.bincount(d.flatten().cpu(), minlength=len(self.depth)).tolist()
        self.depth = [a + b for a, b in zip(self.depth + [0] * len(hist), hist, strict=False)]

    def summary(self) -> dict:
        total = sum(self.depth)
        frac = [c / total for c in self.depth] if total else []
        return {
            "flops_per_token": self.flops / self.positions if self.positions else 0.0,
            "mean_depth": sum(k * f for k, f in enumerate(frac)),
            "depth_fraction": frac,
            "positions": self.positions,
        }


@torch.no_grad()
def forward_logprobs(model, rows: list[list[int]], pad: int, stats: Stats | None):
    """Log-probabilities [b, s, V] of right-padded ``rows`` (causal: padding after a row's
    tokens changes nothing before it; latent halting is per token)."""
    width = max(len(r) for r in rows)
    x = torch.full((len(rows), width), pad, dtype=torch.long)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        x[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        valid[i, : len(r)] = True
    out = model(x, return_logits=True)
    if stats is not None:
        stats.add(out, valid)
    return torch.log_softmax(out.logits.float(), dim=-1)


def score_continuations(
    loaded: LoadedRun,
    requests: Sequence[tuple[list[int], list[int]]],
    batch_size: int = 16,
    stats: Stats | None = None,
) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether it is the greedy continuation) for each
    (context ids, continuation ids); contexts are cut from the left to the model's context. A
    continuation longer than the context is scored in pieces of the context's length, each with
    as much of what precedes it as fits (as a sliding-window perplexity would score it)."""
    window = loaded.seq_len
    prepared, owner = [], []
    for i, (ctx, cont) in enumerate(requests):
        if not cont:
            raise ValueError("an empty continuation has no likelihood")
        seq = list(ctx) + list(cont)
        for a in range(len(ctx), len(seq), window):
            piece = seq[a : a + window]
            whole = seq[: a + len(piece)][-(window + 1) :]
            prepared.append((whole[:-1], piece))
            owner.append(i)
    order = sorted(range(len(prepared)), key=lambda i: -len(prepared[i][0]))
    results: list[tuple[float, bool] | None] = [None] * len(prepared)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        rows = [prepared[i][0] for i in idx]
        logp = forward_logprobs(loaded.model, rows, loaded.eos_id, stats)
        for j, i in enumerate(idx):
            inp, cont = prepared[i]
            n = len(cont)
            lp = logp[j, len(inp) - n : len(inp)]
            target = torch.tensor(cont, dtype=torch.long)
            total = float(lp.gather(-1, target[:, None]).sum())
            greedy = bool((lp.argmax(-1) == target).all())
            results[i] = (total, greedy)
    combined = [(0.0, True)] * len(requests)
    for i, (lp, greedy) in zip(owner, results, strict=True):
        combined[i] = (combined[i][0] + lp, combined[i][1] and greedy)
    return combined
