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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alcot",
        description="Scaling studies for pretraining with token-level adaptive latent "
        "chain-of-thought.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("version", help="print the installed version")
    p.set_defaults(func=cmd_version)
    p = sub.add_parser("smoke", help="train a tiny model on a synthetic corpus for a few seconds")
    p.add_argument(
        "--method",
        default="adaptive",
        choices=["adaptive", "vanilla", "looped", "pause", "ponder", "fixed"],
    )
    p.add_argument("--steps", type=int, default=60)
    p.set_defaults(func=cmd_smoke)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
