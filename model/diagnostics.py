"""Per-token depth diagnostics: does a token that is hard for the ordinary pass run longer?

METHOD.md claim 4 says executed depth correlates with token difficulty. Difficulty is measured
as the cross-entropy of the step-0 prediction (the prediction an ordinary one-pass model would
make), so the question can be asked of one trained model without a second one. The trainer
writes a sample of (step-0 loss, executed depth) pairs at the end of training; analysis reads
them from the run's artifacts and computes the rank correlation.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import torch

from alcot.common.files import atomic_write

COLUMNS = ("step0_loss", "depth")


def has_token_depth(cfg) -> bool:
    """Only adaptive halting and Mixture-of-Recursions give tokens different depths; other
    methods have nothing to show."""
    return cfg.method in ("adaptive", "mor") and cfg.l_max > 0


@torch.no_grad()
def token_depth(model, input_ids: torch.Tensor, labels: torch.Tensor):
    """(step-0 cross-entropy [b, s], executed depth [b, s]) for one batch."""
    was_training = model.training
    model.eval()
    if model.pp > 1:
        from .pipeline import step0_loss_and_depth

        ce0, depth = step0_loss_and_depth(model, input_ids, labels)
        model.train(was_training)
        return ce0, depth
    out, trace = model.latent_forward(input_ids, labels, keep_states=True)
    h0 = trace.hidden[0]  # [s, b, h]: every token runs step 0
    ce0 = model._ce(model._logits(h0), labels.t()).t()
    model.train(was_training)
    return ce0.float().cpu(), out.depth.cpu()


def write_token_depth(model, batches, path: Path, max_tokens: int = 4096, write: bool = True):
    """Run ``batches`` of (input_ids, labels) and write up to ``max_tokens`` rows of
    ``step0_loss,depth`` to ``path`` (atomically). Every model-parallel rank must call this
    (the forward has collectives); only callers with ``write`` set write the file."""
    rows: list[tuple[float, int]] = []
    device = next(model.parameters()).device
    for x, y in batches:
        ce0, depth = token_depth(model, x.to(device), y.to(device))
        rows.extend(zip(ce0.flatten().tolist(), depth.flatten().tolist(), strict=True))
        if len(rows) >= max_tokens:
            break
    if not write:
        return None
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(COLUMNS)
    w.writerows((f"{loss:.5f}", d) for loss, d in rows[:max_tokens])
    return atomic_write(path, buf.getvalue())
