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

import contextlib
import dataclasses
import math
import time
from pathlib import Path

import torch

from alcot.common.typed import ConfigError
from alcot.orchestrator.evaluation.loading import LoadedRun
from alcot.orchestrator.evaluation.perplexity import read_documents, token_stream


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
    from alcot.orchestrator.evaluation.results import keep_result

    metrics = {f"diag/grad/{k}": v for k, v in result["metrics"].items()}
    return keep_result(loaded, result, "diag", "grad", metrics, "diagnosis", log)


# ---------------------------------------------------------------------------------------------
# Training dynamics: what moves the router while a run trains (``alcot diagnose --train``)


def _group_stats(g_ce, g_ad, idx) -> dict[str, float]:
    a = [g_ce[i] for i in idx if g_ce[i] is not None]
    c = [g_ad[i] for i in idx if g_ad[i] is not None]
    n_ce = math.sqrt(sum(float((t * t).sum()) for t in a))
    n_ad = math.sqrt(sum(float((t * t).sum()) for t in c))
    dot = sum(
        float((g_ce[i] * g_ad[i]).sum()) for i in idx if g_ce[i] is not None and g_ad[i] is not None
    )
    return {
        "ce_norm": n_ce,
        "adapt_norm": n_ad,
        "share": n_ad / (n_ce + n_ad) if n_ce + n_ad > 0 else 0.0,
        "cosine": dot / (n_ce * n_ad) if n_ce > 0 and n_ad > 0 else 0.0,
    }


class HaltingProbe:
    """A ``train(probe=...)`` hook: at the chosen steps it runs the step's batch once more with
    the step's starting weights and records, as one JSON-able row:

    * per parameter group (``router``, ``backbone``): the norms of the gradients of the CE and of
      ``lambda_t * L_adapt`` (the weight the step trains with), the adaptive loss's share
      ``|g_ad| / (|g_ce| + |g_ad|)`` and the cosine between them;
    * per latent step k: the share of tokens that ran it (``ran``), their mean gate g(k) and
      reach r(k+1), the mean mixing weight w(k), the CE of W h(k) on the tokens that ran k and
      that of W h(0) on the same tokens (``ce`` / ``ce0``: is the latent state any better than
      the step-0 one?), the mean stop-gradient q(k)[y] the adaptive loss multiplies, and the
      push on the gates: the mean over continuing tokens of d CE / d g(k) and of
      d (lambda_t L_adapt) / d g(k) (negative = that loss wants more continuing), with the share
      of tokens whose gate gets any gradient at all (a pruned token's weights do not depend on
      its gate: once every token is pruned, no loss can re-open the router);
    * the router's bias (linear / per-step routers) and the norm of its weights.
    """

    def __init__(self, steps: set[int], sink):
        self.steps = steps
        self.sink = sink

    def __call__(self, step: int, model, x, y) -> None:
        if step not in self.steps or model.router is None:
            return
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        router = [i for i, (n, _) in enumerate(named) if n.startswith("router.")]
        backbone = [i for i in range(len(named)) if i not in set(router)]
        out, trace = model.latent_forward(x, y, keep_states=True)
        recs = trace.records
        gated = [k for k, r in enumerate(recs) if r.gate is not None]
        gates = [recs[k].gate for k in gated]
        lam = float(model.halting_lambda())
        n_p = len(params)
        wrt = params + gates
        g_ce = torch.autograd.grad(out.ce_loss, wrt, retain_graph=True, allow_unused=True)
        if out.adapt_loss.requires_grad:
            g_ad = torch.autograd.grad(lam * out.adapt_loss, params + gates, allow_unused=True)
        else:
            g_ad = (None,) * len(params + gates)
        row: dict = {
            "step": step,
            "ce": float(out.ce_loss.detach()),
            "adapt": float(out.adapt_loss.detach()),
            "lambda": lam,
            "depth": out.mean_depth,
        }
        for name, idx in (("router", router), ("backbone", backbone)):
            for key, v in _group_stats(g_ce[:n_p], g_ad[:n_p], idx).items():
                row[f"{name}/{key}"] = v
        head0 = None
        with torch.no_grad():
            for k, rec in enumerate(recs):
                ran = rec.ran
                n_ran = int(ran.sum())
                pre = f"k{k}/"
                row[pre + "ran"] = n_ran / ran.numel()
                row[pre + "weight"] = float(rec.weight.mean())
                h = trace.hidden[k]  # [s, b, h]
                lg = model._logits(h.transpose(0, 1)[ran][:, None])  # ran k: [n, 1, V]
                ce_k = model._ce(lg, y[ran][:, None])[:, 0]
                row[pre + "ce"] = float(ce_k.mean())
                if head0 is None:
                    head0 = model._ce(model._logits(h), y.t()).t()  # [b, s] step-0 CE
                row[pre + "ce0"] = float(head0[ran].mean())
                if rec.gate is None:
                    continue
                j = n_p + gated.index(k)
                row[pre + "gate"] = float(rec.gate[ran].mean())
                row[pre + "reach_next"] = float(rec.reach_next[ran].mean())
                if rec.q is not None:
                    row[pre + "q"] = float(rec.q[rec.cont].mean()) if rec.cont.any() else 0.0
                cont = rec.cont
                row[pre + "live"] = float(cont.sum()) / ran.numel()
                for tag, g in (("dce_dg", g_ce[j]), ("dadapt_dg", g_ad[j])):
                    row[pre + tag] = float(g[cont].mean()) if g is not None and cont.any() else 0.0
            lin = getattr(model.router, "steps", None)
            if lin is not None:
                row["router/bias"] = float(lin[0].bias.reshape(-1)[0])
                row["router/weight_norm"] = float(lin[0].weight.norm())
        self.sink(row)


def training_dynamics(
    cfg, out_dir: Path, steps: int, every: int, log=print
) -> tuple[list[dict], list[dict]]:
    """Train ``cfg`` (a RunConfig) for ``steps`` steps of its schedule (``train.steps`` stays
    the schedule's length) into ``out_dir``, probing every ``every``-th step (and steps 1-10).
    Returns (probe rows, the trainer's metrics every step); nothing goes to MLflow."""
    from alcot.data.preparation import check_enough, prepare
    from alcot.model.trainer import Callback, train
    from alcot.orchestrator.config import alcot_home
    from alcot.orchestrator.training_run import resolve

    m = cfg.model
    if not m.uses_router:
        raise ConfigError("model.method", f"method {m.method!r} has no router to diagnose")
    if m.pipeline_parallel_size > 1:
        raise ConfigError("model.pipeline_parallel_size", "the training probe runs one stage")
    if steps < 1 or every < 1:
        raise ConfigError("--steps", "steps and --every must be >= 1")
    data = prepare(cfg.data, cfg.data.cache_dir or alcot_home() / "cache", log=log)
    check_enough(cfg.data, data)
    cfg = resolve(cfg, data.vocab_size)
    rows: list[dict] = []
    history: list[dict] = []
    wanted = {s for s in range(1, steps + 1) if s <= 10 or s % every == 0}
    probe = HaltingProbe(wanted, rows.append)

    class _Stop(Exception):
        pass

    class _Metrics(Callback):
        def on_step_end(self, step, metrics):
            history.append({"step": step, **metrics})
            if step >= steps:
                raise _Stop

    tcfg = dataclasses.replace(cfg.train, eval_every=max(every, 1), checkpoint_every=10**9)
    out_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(_Stop):
        train(
            cfg.model,
            data,
            tcfg,
            cfg.seed,
            out_dir,
            cfg.data.seq_len,
            [_Metrics()],
            progress=False,
            log=log,
            resume_from=None,
            probe=probe,
        )
    return rows, history
