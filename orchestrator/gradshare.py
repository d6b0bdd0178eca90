"""How much of a trained adaptive model's gradient comes from the adaptive (halting) loss.

``alcot diagnose RUN --text FILE`` loads the run's newest checkpoint, takes ``batches`` evenly
spaced windows of ``data.seq_len`` tokens from the file, and computes the gradients of the
cross-entropy and of ``lambda * L_adapt`` separately, for the router's parameters and for the
rest of the network. Per group it reports the norm of each, their ratio and their cosine
(mean over batches), logged to the run's MLflow entry as ``diag/grad/...`` at the checkpoint's
step (through the run folder's journal, like ``alcot eval``) and kept as JSON in the run
folder's ``diag/``. A ratio near 0 says the halting loss hardly trains anything: the router
then learns only from the cross-entropy through the mixing weights.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from alcot.model.typed import ConfigError

from .evaluate import LoadedRun, read_documents, token_stream


def _windows(ids: list[int], seq: int, n: int) -> torch.Tensor:
    span = seq + 1
    if len(ids) < span:
        raise ConfigError("--text", f"has {len(ids)} tokens, fewer than one window of {span}")
    last = len(ids) - span
    starts = [round(i * last / max(n - 1, 1)) for i in range(n)]
    return torch.tensor([ids[s : s + span] for s in starts], dtype=torch.long)


def gradient_share(loaded: LoadedRun, path: Path, batches: int = 4, batch_size: int = 8) -> dict:
    """Norms, ratio and cosine of the CE and adaptive-loss gradients, per parameter group."""
    m = loaded.cfg.model
    if not m.uses_router:
        raise ConfigError("RUN", f"method {m.method!r} has no router: no adaptive loss to measure")
    if batches < 1 or batch_size < 1:
        raise ConfigError("--batches", "batches and batch size must be >= 1")
    ids, _ = token_stream(loaded, read_documents(Path(path)))
    data = _windows(ids, loaded.seq_len, batches * batch_size)
    model = loaded.model
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = {"router": [i for i, (n, _) in enumerate(named) if "router" in n]}
    groups["backbone"] = [i for i in range(len(named)) if i not in set(groups["router"])]
    params = [p for _, p in named]
    lam = float(m.halting.lambda_)
    sums: dict[str, float] = {}
    torch.manual_seed(0)
    for b in range(batches):
        x = data[b * batch_size : (b + 1) * batch_size]
        out = model(x[:, :-1], x[:, 1:])
        g_ce = torch.autograd.grad(out.ce_loss, params, retain_graph=True, allow_unused=True)
        g_ad = torch.autograd.grad(lam * out.adapt_loss, params, allow_unused=True)
        for name, idx in groups.items():
            a = [g_ce[i] for i in idx if g_ce[i] is not None]
            c = [g_ad[i] for i in idx if g_ad[i] is not None]
            n_ce = math.sqrt(sum(float((t * t).sum()) for t in a))
            n_ad = math.sqrt(sum(float((t * t).sum()) for t in c))
            dot = sum(
                float((g_ce[i] * g_ad[i]).sum())
                for i in idx
                if g_ce[i] is not None and g_ad[i] is not None
            )
            cos = dot / (n_ce * n_ad) if n_ce > 0 and n_ad > 0 else 0.0
            for key, v in (
                ("ce_norm", n_ce),
                ("adapt_norm", n_ad),
                ("ratio", n_ad / n_ce if n_ce > 0 else math.inf),
                ("cosine", cos),
            ):
                sums[f"{name}_{key}"] = sums.get(f"{name}_{key}", 0.0) + v / batches
        sums["ce_loss"] = sums.get("ce_loss", 0.0) + float(out.ce_loss.detach()) / batches
        sums["adapt_loss"] = sums.get("adapt_loss", 0.0) + float(out.adapt_loss.detach()) / batches
    return {
        "run_dir": str(loaded.run_dir),
        "step": loaded.checkpoint.step,
        "text": str(path),
        "tokens": int(batches * batch_size * loaded.seq_len),
        "lambda": lam,
        "time": time.time(),
        "metrics": sums,
    }


def record(loaded: LoadedRun, result: dict, log=print) -> Path:
    """Keep ``result`` as ``diag/<time>-grad.json`` in the run folder and send its metrics
    (``diag/grad/<name>``) to the run's MLflow entry through the folder's journal."""
    from .evaluate import keep_result

    metrics = {f"diag/grad/{k}": v for k, v in result["metrics"].items()}
    return keep_result(loaded, result, "diag", "grad", metrics, "diagnosis", log)
