"""The evaluation subcommands of ``alcot``: ``eval``, ``generate``, ``export`` (parsers and
handlers; the work is in :mod:`.evaluate`, :mod:`.depthview`, :mod:`.export`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _floats(text: str) -> list[float]:
    return [float(x) for x in str(text).replace(",", " ").split()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in str(text).replace(",", " ").split()]


def cmd_eval(args: argparse.Namespace) -> int:
    from alcot.common.typed import ConfigError
    from alcot.orchestrator.evaluation.loading import load_run
    from alcot.orchestrator.evaluation.results import record
    from alcot.orchestrator.evaluation.suite import EvalSpec, check_spec, run_eval, table

    tasks = [t for item in args.tasks or [] for t in item.split(",") if t.strip()]
    spec = EvalSpec(
        texts=[Path(p) for p in args.text or []],
        tasks=tasks,
        data_dir=Path(args.data_dir).expanduser().resolve() if args.data_dir else None,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        taus=[t for item in args.tau or [] for t in _floats(item)],
        l_maxes=[k for item in args.l_max or [] for k in _ints(item)],
        batch_size=args.batch_size,
        stride=args.stride,
        text_field=args.text_field,
    )
    try:
        check_spec(spec)  # inputs first: no model is loaded for a typo
        loaded = load_run(args.run, args.config, threads=args.threads)
        result = run_eval(loaded, spec, log=lambda m: print(m, file=sys.stderr))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if not args.no_log:
        path = record(loaded, result, log=lambda m: print(m, file=sys.stderr))
        print(f"results: {path}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from alcot.common.typed import ConfigError
    from alcot.orchestrator.evaluation.budgets import apply_budget, budgets
    from alcot.orchestrator.evaluation.generation_view import (
        ansi,
        generate_view,
        html_page,
        read_prompts,
    )
    from alcot.orchestrator.evaluation.loading import load_run
    from alcot.orchestrator.evaluation.results import log_artifacts

    try:
        if (args.prompt is None) == (args.prompt_file is None):
            raise ConfigError("--prompt", "give --prompt TEXT or --prompt-file FILE (one of them)")
        prompts = read_prompts(args.prompt, args.prompt_file)
        loaded = load_run(args.run, args.config)
        (budget,) = budgets(
            loaded, [args.tau] if args.tau is not None else [], [args.l_max] if args.l_max else []
        )
        apply_budget(loaded, budget)
        views = [
            generate_view(
                loaded,
                p,
                args.max_new_tokens,
                args.temperature,
                args.seed,
                what=f"prompt {i + 1}" if len(prompts) > 1 else "the prompt",
            )
            for i, p in enumerate(prompts)
        ]
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    colour = sys.stdout.isatty() if args.color == "auto" else args.color == "always"
    for v in views:
        if colour:
            print(ansi(v))
        else:
            print("".join(t.text if t.depth is None else f"{t.text}[{t.depth}]" for t in v.tokens))
        print()
    written = []
    if args.html:
        path = Path(args.html)
        path.write_text(html_page(views, f"alcot generate: {loaded.run_dir.name}"))
        written.append(path)
        print(f"page: {path}")
    if args.json:
        path = Path(args.json)
        path.write_text(json.dumps([v.to_dict() for v in views], indent=1))
        written.append(path)
    if args.log and written:
        log_artifacts(loaded, written, "generate", log=lambda m: print(m, file=sys.stderr))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from alcot.common.typed import ConfigError
    from alcot.orchestrator.evaluation.loading import load_run

    try:
        from alcot.orchestrator.export.hf import export_hf

        loaded = load_run(args.run, args.config)
        out = export_hf(loaded, Path(args.hf), overwrite=args.overwrite)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ImportError as err:
        print(f"error: export needs the eval extra ({err}): scripts/install.sh", file=sys.stderr)
        return 2
    print(f"Hugging Face model folder: {out}")
    print(
        "load it with: AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True), "
        "AutoTokenizer.from_pretrained(DIR)"
    )
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity on text files and downstream tasks (lm-eval) of a finished run",
        description="Evaluate a run (run folder, checkpoint folder or MLflow run id). Results "
        "go to the run's MLflow entry (eval/...) and a JSON in the run folder's eval/.",
    )
    p.add_argument("run", help="run folder, checkpoint folder (step_*), or MLflow run id")
    p.add_argument("--text", nargs="+", metavar="FILE", help="UTF-8 text or jsonl files")
    p.add_argument("--text-field", default="text", help="the text field of jsonl files")
    p.add_argument("--stride", type=int, default=None, help="window stride (default: context)")
    p.add_argument(
        "--tasks",
        action="append",
        metavar="NAME[,NAME...]",
        help="lm-eval tasks: lambada, arc_easy, arc_challenge, piqa, winogrande, hellaswag, "
        "openbookqa, copa, wikitext2 (local files under --data-dir), or any lm-eval task",
    )
    p.add_argument("--data-dir", default=None, help="folder with the tasks' data files")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--limit", type=int, default=None, help="at most N examples per task")
    p.add_argument(
        "--tau", action="append", metavar="T[,T...]", help="test-time pruning threshold(s)"
    )
    p.add_argument(
        "--l-max", action="append", metavar="K[,K...]", help="test-time latent step limit(s)"
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--config", default=None, help="read the model from this config.yaml")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--no-log", action="store_true", help="record nothing (no MLflow, no file)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "generate",
        help="generate from a run, showing each token's executed latent depth",
    )
    p.add_argument("run", help="run folder, checkpoint folder (step_*), or MLflow run id")
    p.add_argument("--prompt", default=None, help="the prompt text")
    p.add_argument("--prompt-file", default=None, help="a UTF-8 file of prompts, one a line")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tau", type=float, default=None, help="test-time pruning threshold")
    p.add_argument("--l-max", type=int, default=None, help="test-time latent step limit")
    p.add_argument("--html", default=None, help="write a page shading tokens by depth")
    p.add_argument("--json", default=None, help="write tokens, depths and probabilities")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    p.add_argument("--log", action="store_true", help="log the files to the run's MLflow entry")
    p.add_argument("--config", default=None, help="read the model from this config.yaml")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export", help="write a run as a Hugging Face transformers model folder")
    p.add_argument("run", help="run folder, checkpoint folder (step_*), or MLflow run id")
    p.add_argument("--hf", required=True, metavar="DIR", help="the folder to write")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty folder")
    p.add_argument("--config", default=None, help="read the model from this config.yaml")
    p.set_defaults(func=cmd_export)
