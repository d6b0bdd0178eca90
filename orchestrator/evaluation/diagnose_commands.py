"""``alcot diagnose``: gradient shares of a trained run, or the training dynamics of a config."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_diagnose(args: argparse.Namespace) -> int:
    from alcot.common.typed import ConfigError
    from alcot.orchestrator.evaluation.gradient_share import gradient_share, record
    from alcot.orchestrator.evaluation.loading import load_run

    if args.train is not None:
        return _diagnose_training(args)
    if args.run is None or args.text is None:
        print("error: RUN and --text are needed (or --train CONFIG)", file=sys.stderr)
        return 2
    try:
        loaded = load_run(args.run, threads=args.threads)
        result = gradient_share(loaded, Path(args.text), args.batches, args.batch_size)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for key, value in result["metrics"].items():
        print(f"{key:20s} {value:.6g}")
    if not args.no_log:
        record(loaded, result, log=lambda m: print(m, file=sys.stderr))
    return 0


def _diagnose_training(args: argparse.Namespace) -> int:
    """``alcot diagnose --train CONFIG``: the router's training dynamics (gradshare.py)."""
    import json

    from alcot.common.files import atomic_write
    from alcot.common.typed import ConfigError
    from alcot.orchestrator.config import load_run_config
    from alcot.orchestrator.evaluation.gradient_share import training_dynamics

    if args.out is None:
        print("error: --out FOLDER is needed with --train", file=sys.stderr)
        return 2
    out = Path(args.out)
    try:
        cfg = load_run_config(args.train, args.set)
        if args.threads:
            cfg.train.threads = args.threads
        rows, history = training_dynamics(cfg, out / "run", args.steps, args.every, log=print)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, items in (("probe.jsonl", rows), ("train.jsonl", history)):
        atomic_write(out / name, "".join(json.dumps(r) + "\n" for r in items))
    keys = ("step", "depth", "ce", "router/share", "router/cosine", "backbone/share")
    print(" ".join(f"{k:>14s}" for k in keys + ("k0/dce_dg", "k0/dadapt_dg", "k0/gate")))
    for r in rows:
        vals = [r.get(k, float("nan")) for k in keys + ("k0/dce_dg", "k0/dadapt_dg", "k0/gate")]
        print(" ".join(f"{v:14.5g}" for v in vals))
    print(f"wrote {out / 'probe.jsonl'} and {out / 'train.jsonl'}")
    return 0


def add_parsers(sub) -> None:
    """Add this room's subcommands to the ``alcot`` parser."""
    p = sub.add_parser(
        "diagnose", help="the adaptive loss's share of a trained run's gradient (diag/grad/...)"
    )
    p.add_argument(
        "run", nargs="?", help="run folder, checkpoint folder (step_*), or MLflow run id"
    )
    p.add_argument("--text", help="UTF-8 text or jsonl file to take batches from")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--no-log", action="store_true", help="print only; record nothing")
    p.add_argument(
        "--train",
        metavar="CONFIG",
        help="instead: train CONFIG from scratch for --steps steps of its schedule and record "
        "what moves the router (gradient shares and cosines, gates, reach, weights, per-step "
        "losses) to --out/probe.jsonl; nothing is tracked",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=10, help="probe every N steps (and steps 1-10)")
    p.add_argument("--out", help="folder for --train's records")
    p.set_defaults(func=cmd_diagnose)
