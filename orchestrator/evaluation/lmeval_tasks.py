"""Downstream tasks through the lm-eval harness (0.4.x), read from local data files.

``orchestrator/evaluation/tasks/*.yaml.in`` are lm-eval task configs whose data files sit under
a data folder laid out like the project's shared data (``lambada/lambada_test.jsonl``,
``llm-foundry-mc/arc_easy.jsonl``, ...). :func:`render_tasks` writes them, with the data folder
filled in, into a folder lm-eval reads with ``include_path``. Short names (``lambada``,
``arc_easy``, ...) stand for the shipped tasks; any other name is passed to lm-eval as it is
(its own task registry).
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from pathlib import Path

from alcot.common.typed import ConfigError

TEMPLATES = Path(__file__).resolve().parent / "tasks"
PLACEHOLDER = "__DATA_DIR__"

# short name -> shipped task
ALIASES = {
    "lambada": "alcot_lambada_openai",
    "lambada_openai": "alcot_lambada_openai",
    "arc_easy": "alcot_arc_easy",
    "arc_challenge": "alcot_arc_challenge",
    "piqa": "alcot_piqa",
    "winogrande": "alcot_winogrande",
    "hellaswag": "alcot_hellaswag",
    "openbookqa": "alcot_openbookqa",
    "copa": "alcot_copa",
    "wikitext2": "alcot_wikitext2",
    "wikitext": "alcot_wikitext2",
}

WIKITEXT_UTILS = '''"""lm-eval's own WikiText helpers, for the rendered alcot_wikitext2 task."""
from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer

__all__ = ["process_results", "wikitext_detokenizer"]
'''


def shipped() -> dict[str, str]:
    """Shipped task name -> template text."""
    return {p.name[: -len(".yaml.in")]: p.read_text() for p in sorted(TEMPLATES.glob("*.yaml.in"))}


def canonical(name: str) -> str:
    return ALIASES.get(name, name)


def data_files(template: str) -> list[str]:
    """The data files a template reads, relative to the data folder."""
    return re.findall(re.escape(PLACEHOLDER) + r"/(\S+)", template)


def check_tasks(tasks: list[str], data_dir: Path | None) -> list[str]:
    """Canonical task names; a shipped task needs ``data_dir`` holding its files, any other
    name must be a task lm-eval knows. Errors name the task or the missing file."""
    ours = shipped()
    names = [canonical(t.strip()) for t in tasks if t.strip()]
    if not names:
        raise ConfigError("--tasks", "no task named")
    local = [n for n in names if n in ours]
    if local:
        if data_dir is None:
            raise ConfigError(
                "--data-dir", f"tasks {', '.join(local)} read local files: give --data-dir"
            )
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise ConfigError("--data-dir", f"{root} is not a folder")
        for n in local:
            for rel in data_files(ours[n]):
                if not (root / rel).is_file():
                    raise ConfigError("--data-dir", f"task {n} needs {root / rel}: missing")
    others = [n for n in names if n not in ours]
    if others:
        from lm_eval.tasks import TaskManager

        known = set(TaskManager().all_tasks)
        unknown = [n for n in others if n not in known]
        if unknown:
            raise ConfigError(
                "--tasks",
                f"unknown task {', '.join(unknown)}; shipped tasks: "
                f"{', '.join(sorted(set(ALIASES)))} (or any lm-eval task name)",
            )
    return names


def render_tasks(data_dir: Path, out: Path | None = None) -> Path:
    """Write the shipped task configs for ``data_dir`` into ``out`` (default: a folder under
    the temp dir keyed by the data folder); returns the folder for lm-eval's include_path."""
    root = Path(data_dir).expanduser().resolve()
    if out is None:
        key = hashlib.sha256(str(root).encode()).hexdigest()[:12]
        out = Path(tempfile.gettempdir()) / f"alcot-lmeval-tasks-{key}"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in shipped().items():
        (out / f"{name}.yaml").write_text(text.replace(PLACEHOLDER, str(root)))
    (out / "alcot_wikitext.py").write_text(WIKITEXT_UTILS)
    return out


def task_manager(names: list[str], data_dir: Path | None):
    from lm_eval.tasks import TaskManager

    ours = shipped()
    include = str(render_tasks(data_dir)) if data_dir is not None else None
    defaults = any(n not in ours for n in names)
    return TaskManager(include_path=include, include_defaults=defaults)


def _clean(metrics: dict) -> dict:
    """lm-eval's ``acc,none`` / ``acc_stderr,none`` keys as ``acc`` / ``acc_stderr``."""
    out = {}
    for k, v in metrics.items():
        if k in ("alias", "sample_len") or not isinstance(v, int | float):
            continue
        name, _, filt = k.partition(",")
        out[name if filt in ("", "none") else f"{name}_{filt}"] = float(v)
    return out


def evaluate_tasks(loaded, spec):
    """Run ``spec.tasks`` on the loaded run at its current budget. Returns (task -> metrics
    with lm-eval's standard errors, the forwards' :class:`Stats`)."""
    import os

    import lm_eval

    from alcot.orchestrator.evaluation.lmeval_model import AlcotHarnessLM

    # lm-eval bootstraps stderrs (perplexity's) in a fork-based multiprocessing pool: forked
    # from a multi-threaded process (a Ray worker, torch's threads) its workers can hang for
    # good, and the evaluation with them. The in-process bootstrap of 1000 draws takes
    # milliseconds.
    os.environ.setdefault("DISABLE_MULTIPROC", "1")

    names = check_tasks(spec.tasks, spec.data_dir)
    lm = AlcotHarnessLM(loaded=loaded, batch_size=spec.batch_size)
    res = lm_eval.simple_evaluate(
        model=lm,
        tasks=names,
        num_fewshot=spec.num_fewshot,
        limit=spec.limit,
        task_manager=task_manager(names, spec.data_dir),
        log_samples=False,
        bootstrap_iters=1000,
        random_seed=spec.seed,
        numpy_random_seed=spec.seed,
        torch_random_seed=spec.seed,
        fewshot_random_seed=spec.seed,
    )
    tasks = {name: _clean(m) for name, m in res["results"].items()}
    return tasks, lm.stats
