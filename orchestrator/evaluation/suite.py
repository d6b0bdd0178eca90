"""An evaluation suite: what to evaluate (``EvalSpec``: texts, lm-eval tasks, test-time
budgets), checking it before anything runs, running it on a loaded run, and its table.

Every input is checked before anything is computed or recorded: a bad one is a
:class:`ConfigError` naming it (exit code 2 in the CLI) and nothing reaches MLflow.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from alcot.common.typed import ConfigError
from alcot.orchestrator.evaluation.budgets import TestTimeBudget, apply_budget, budgets
from alcot.orchestrator.evaluation.loading import LoadedRun
from alcot.orchestrator.evaluation.perplexity import corpus_name, read_documents, text_metrics
from alcot.orchestrator.evaluation.scoring import Stats


@dataclass
class EvalSpec:
    texts: list[Path] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    data_dir: Path | None = None
    num_fewshot: int | None = None
    limit: int | None = None
    taus: list[float] = field(default_factory=list)
    l_maxes: list[int] = field(default_factory=list)
    batch_size: int = 16
    stride: int | None = None
    text_field: str = "text"
    seed: int = 1234

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["texts"] = [str(p) for p in self.texts]
        d["data_dir"] = str(self.data_dir) if self.data_dir else None
        return d

    def key(self) -> str:
        """Identity of what is evaluated (for skipping work already done)."""
        import hashlib

        d = self.to_dict()
        d.pop("batch_size")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def check_spec(spec: EvalSpec) -> None:
    """Everything about the inputs that can be checked without a model."""
    if not spec.texts and not spec.tasks:
        raise ConfigError("eval", "nothing to evaluate: give --text FILE and/or --tasks NAMES")
    for p in spec.texts:
        read_documents(p, spec.text_field)  # existence, UTF-8, fields
    if spec.tasks:
        from alcot.orchestrator.evaluation.lmeval_tasks import check_tasks

        check_tasks(spec.tasks, spec.data_dir)
    if spec.limit is not None and spec.limit < 1:
        raise ConfigError("--limit", f"must be >= 1, got {spec.limit}")
    if spec.num_fewshot is not None and spec.num_fewshot < 0:
        raise ConfigError("--num-fewshot", f"must be >= 0, got {spec.num_fewshot}")


def run_eval(loaded: LoadedRun, spec: EvalSpec, log=print) -> dict:
    """Evaluate ``loaded`` at every budget of ``spec``; returns the result document."""
    check_spec(spec)
    todo = budgets(loaded, spec.taus, spec.l_maxes)
    result = {
        "run_dir": str(loaded.run_dir),
        "checkpoint": str(loaded.checkpoint.path),
        "step": loaded.checkpoint.step,
        "method": loaded.cfg.model.method,
        "size": loaded.cfg.model.size,
        "trained": dataclasses.asdict(loaded.trained),
        "spec": spec.to_dict(),
        "spec_key": spec.key(),
        "time": time.time(),
        "budgets": [],
    }
    for b in todo:
        apply_budget(loaded, b)
        entry: dict = {"tau": b.tau, "l_max": b.l_max, "label": b.label, "corpora": {}}
        stats = Stats()
        for path in spec.texts:
            log(f"[{b.label}] perplexity of {path}")
            m = text_metrics(loaded, path, spec.stride, spec.batch_size, spec.text_field)
            entry["corpora"][corpus_name(path)] = m
            stats.flops += m["flops_per_token"] * m["tokens"]
            stats.positions += m["tokens"]
        if spec.tasks:
            from alcot.orchestrator.evaluation.lmeval_tasks import evaluate_tasks

            log(f"[{b.label}] lm-eval tasks {', '.join(spec.tasks)}")
            tasks, task_stats = evaluate_tasks(loaded, spec)
            entry["tasks"] = tasks
            stats.flops += task_stats.flops
            stats.positions += task_stats.positions
            entry["task_cost"] = task_stats.summary()
        entry["flops_per_token"] = stats.flops / stats.positions if stats.positions else 0.0
        result["budgets"].append(entry)
    apply_budget(loaded, loaded.trained)
    return result


def metrics_of(result: dict) -> dict[str, float]:
    """MLflow metrics: ``eval/<task>/<metric>`` and ``eval/<corpus>/ppl`` (and bits per byte,
    FLOPs per token, mean depth) at the trained budget, and the same under
    ``eval/budget/<tau_..._lmax_...>/`` for every budget evaluated. ``flops_per_token`` is over
    everything this evaluation ran; ``<corpus>/flops_per_token`` and ``tasks/flops_per_token``
    (the lm-eval forwards) are per part."""
    trained = TestTimeBudget(**result["trained"])
    out: dict[str, float] = {}
    for entry in result["budgets"]:
        b = TestTimeBudget(entry["tau"], entry["l_max"])
        flat = {"flops_per_token": entry["flops_per_token"]}
        for name, m in entry["corpora"].items():
            for k in ("ppl", "bits_per_byte", "flops_per_token", "mean_depth"):
                flat[f"{name}/{k}"] = m[k]
        for task, ms in entry.get("tasks", {}).items():
            for k, v in ms.items():
                if isinstance(v, int | float) and math.isfinite(v):
                    flat[f"{task}/{k}"] = float(v)
        if "task_cost" in entry:  # what the lm-eval tasks' forwards spent, all tasks together
            flat["tasks/flops_per_token"] = entry["task_cost"]["flops_per_token"]
            flat["tasks/mean_depth"] = entry["task_cost"]["mean_depth"]
        for k, v in flat.items():
            out[f"eval/budget/{b.key}/{k}"] = v
            if b == trained:
                out[f"eval/{k}"] = v
    return out


def _num(v: float) -> str:
    return f"{v:.4f}" if abs(v) < 1e5 else f"{v:.4g}"


def table(result: dict) -> str:
    """The results as a fixed-width table: one row per (budget, corpus or task metric)."""
    rows = [("budget", "what", "metric", "value", "± stderr")]
    for entry in result["budgets"]:
        rows.append((entry["label"], "all", "FLOPs/token", f"{entry['flops_per_token']:.4g}", ""))
        for name, m in entry["corpora"].items():
            rows.append((entry["label"], name, "ppl", f"{m['ppl']:.3f}", ""))
            rows.append((entry["label"], name, "bits/byte", f"{m['bits_per_byte']:.4f}", ""))
            rows.append((entry["label"], name, "mean depth", f"{m['mean_depth']:.3f}", ""))
        for task, ms in entry.get("tasks", {}).items():
            for k, v in ms.items():
                if k.endswith("_stderr") or not isinstance(v, int | float):
                    continue
                err = ms.get(f"{k}_stderr")
                err_s = _num(err) if isinstance(err, int | float) else ""
                rows.append((entry["label"], task, k, _num(v), err_s))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def spec_from_section(section: dict) -> EvalSpec:
    """An :class:`EvalSpec` from a sweep's ``eval:`` section (paths already absolute)."""
    d = dict(section)
    return EvalSpec(
        texts=[Path(p) for p in d.get("texts") or []],
        tasks=list(d.get("tasks") or []),
        data_dir=Path(d["data_dir"]) if d.get("data_dir") else None,
        num_fewshot=d.get("num_fewshot"),
        limit=d.get("limit"),
        taus=[float(t) for t in d.get("tau") or []],
        l_maxes=[int(k) for k in d.get("l_max") or []],
        batch_size=int(d.get("batch_size") or 16),
    )
