"""The ``alcot`` command. Each subcommand parses its arguments and calls into the library."""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import PackageNotFoundError, version


def _version() -> str:
    try:
        return version("alcot")
    except PackageNotFoundError:  # running from a source tree without an install
        return "0+unknown"


def cmd_version(args: argparse.Namespace) -> int:
    print(f"alcot {_version()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alcot",
        description="Scaling studies for pretraining with token-level adaptive latent "
        "chain-of-thought.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("version", help="print the installed version")
    p.set_defaults(func=cmd_version)
    from alcot.orchestrator.analysis_commands import add_parsers as add_analysis
    from alcot.orchestrator.evaluation.diagnose_commands import add_parsers as add_diagnose
    from alcot.orchestrator.evaluation.eval_commands import add_parsers as add_eval
    from alcot.orchestrator.run_commands import add_parsers as add_run
    from alcot.orchestrator.sweeps.sweep_commands import add_parsers as add_sweep
    from alcot.orchestrator.tracking.tracking_commands import add_parsers as add_tracking

    for add in (add_run, add_sweep, add_analysis, add_diagnose, add_tracking, add_eval):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    import os

    from alcot.common.typed import ConfigError
    from alcot.orchestrator.config import check_uri_credentials

    try:  # the URI is recorded (tracking.json, Ray job env): never with a password in it
        check_uri_credentials(os.environ.get("MLFLOW_TRACKING_URI"), "MLFLOW_TRACKING_URI")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
