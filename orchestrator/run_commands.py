"""``alcot smoke``, ``alcot train`` and ``alcot data prepare``: one run, and its data."""

from __future__ import annotations

import argparse
import sys

from alcot.orchestrator.tracking.tracking_commands import ui_hint


def cmd_smoke(args: argparse.Namespace) -> int:
    from alcot.model.smoke import run_smoke

    res = run_smoke(method=args.method, steps=args.steps)
    print(
        f"{args.method}: cross-entropy {res.first_loss:.3f} -> {res.last_loss:.3f} in "
        f"{res.seconds:.1f} s, mean latent depth {res.mean_depth:.2f}, "
        f"realised training FLOPs {res.realised_flops:.3g}"
    )
    if not res.last_loss < res.first_loss:
        print("error: the loss did not fall", file=sys.stderr)
        return 1
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from alcot.common.typed import ConfigError
    from alcot.orchestrator.config import load_run_config

    try:
        cfg = load_run_config(args.config, args.set or [])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from alcot.orchestrator.tracking.lease import LeaseLost
    from alcot.orchestrator.training_run import run_training

    try:
        outcome = run_training(cfg, progress=not args.no_progress)
    except ConfigError as err:  # problems found while preparing (data path, tracking store)
        print(f"error: {err}", file=sys.stderr)
        return 2
    except LeaseLost as err:  # frozen past the lease ttl and replaced: the other one goes on
        print(f"error: {err}", file=sys.stderr)
        return 3
    res = outcome.result
    print(f"run folder: {outcome.out_dir}")
    if outcome.run_id:
        print(f"MLflow run: {outcome.run_id}")
        print(f"see it with: {ui_hint(outcome.tracking_uri)}")
    if res.status != "finished":
        print(f"error: {res.message}", file=sys.stderr)
        return 1
    m = res.metrics
    if "val/loss" in m:
        print(
            f"step {res.step}: val loss {m['val/loss']:.4f} (ppl {m['val/ppl']:.2f}), "
            f"mean depth {m['val/mean_depth']:.2f}"
        )
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    """Tokenise a run config's corpus into the token cache (Megatron-Core .bin/.idx shards)."""
    from alcot.common.typed import ConfigError
    from alcot.data.preparation import check_enough, prepare
    from alcot.orchestrator.config import alcot_home, load_run_config

    try:
        cfg = load_run_config(args.config, args.set or [])
        data = prepare(cfg.data, cfg.data.cache_dir or alcot_home() / "cache")
        check_enough(cfg.data, data)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    done = "cached" if data.cache_hit else "prepared"
    print(
        f"{'checked' if cfg.data.source == 'megatron' else done}: {data.n_train} training and "
        f"{data.n_val} validation tokens, vocabulary {data.vocab_size}"
    )
    if cfg.data.source == "megatron":  # checked where it is; split when training starts
        print("prefixes: " + ", ".join(data.prefixes))
    for split in ("train", "val") if cfg.data.source != "megatron" else ():
        prefixes = data.train_prefixes if split == "train" else data.val_prefixes
        print(f"{split} prefixes (data.source: megatron, data.path):")
        for p in prefixes:
            print(f"  {p}")
    if data.tokenizer_path:
        print(f"tokenizer: {data.tokenizer_path}")
    return 0


def add_parsers(sub) -> None:
    """Add this room's subcommands to the ``alcot`` parser."""
    p = sub.add_parser("smoke", help="train a tiny model on a synthetic corpus for a few seconds")
    p.add_argument(
        "--method",
        default="adaptive",
        choices=["adaptive", "vanilla", "looped", "pause", "ponder", "fixed", "mor"],
    )
    p.add_argument("--steps", type=int, default=60)
    p.set_defaults(func=cmd_smoke)

    p = sub.add_parser("train", help="train one model from a run config (YAML)")
    p.add_argument("config", help="run config YAML (see configs/)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set model.halting.lambda=0.1 (repeatable)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("data", help="prepare a run config's corpus (token cache)")
    dsub = p.add_subparsers(dest="data_command", metavar="COMMAND")
    q = dsub.add_parser(
        "prepare", help="tokenise the corpus into Megatron-Core .bin/.idx shards (cached)"
    )
    q.add_argument("config", help="run config YAML (its data: section)")
    q.add_argument("--set", action="append", metavar="KEY=VALUE", help="override (repeatable)")
    q.set_defaults(func=cmd_data_prepare)
