"""``alcot analyze`` and ``alcot study export|report``: analysis of a study's MLflow runs
(the analysis itself is ``alcot.analysis``; this is its command line)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_analyze(args: argparse.Namespace) -> int:
    from alcot.analysis.load import AnalysisError, Study
    from alcot.analysis.report import build_report, log_report

    try:
        study = Study.load(args.experiment, args.sweep, args.tracking_uri)
        report = build_report(
            study,
            Path(args.out),
            flops=args.flops,
            points=args.points,
            n_boot=args.bootstrap,
            level=args.level,
            target_ppl=args.target_ppl,
            seed=args.seed,
        )
    except AnalysisError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"report: {report.markdown}")
    print(f"        {report.html}")
    print(f"plots:  {len(report.figures)} files (PNG and SVG) in {report.out_dir}")
    if not args.no_log:
        run_id = log_report(study, report)
        print(f"logged as artifacts (analysis/) of MLflow run {run_id}; see them with: alcot ui")
    return 0


def cmd_study_export(args: argparse.Namespace) -> int:
    from alcot.analysis.load import AnalysisError
    from alcot.analysis.study_export import export_runs

    try:
        info = export_runs(args.experiment, args.out, args.tracking_uri)
    except AnalysisError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"exported {info['runs']} runs ({info['points']} metric points, {info['artifacts']} "
        f"depth samples) to {args.out} ({info['bytes'] / 1e6:.2f} MB)"
    )
    return 0


def cmd_study_report(args: argparse.Namespace) -> int:
    from alcot.analysis.load import AnalysisError, Study
    from alcot.analysis.study import build, rebuild

    opts = {
        "n_boot": args.bootstrap,
        "level": args.level,
        "seed": args.seed,
        "points": args.points,
    }
    try:
        if args.from_export:
            report, claims = rebuild(args.from_export, Path(args.out), **opts)
        else:
            study = Study.load(args.experiment, None, args.tracking_uri)
            report, claims = build(study, Path(args.out), **opts)
    except AnalysisError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"report: {report.markdown}")
    print(f"claims: {Path(args.out) / 'claims.md'} ({len(claims.tables)} tables in tables/)")
    return 0


def add_fit_options(p: argparse.ArgumentParser, points_help: str) -> None:
    """The options ``alcot analyze`` and ``alcot study report`` share: which points the fits
    see, their bootstrap, the intervals' level, the seed, and the MLflow store."""
    p.add_argument(
        "--points", choices=["envelope", "final", "all"], default="envelope", help=points_help
    )
    p.add_argument(
        "--bootstrap", type=int, default=200, help="bootstrap replicates of the fits (0: none)"
    )
    p.add_argument("--level", type=float, default=0.9, help="confidence level of intervals")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: ALCOT_HOME's)")


def add_parsers(sub) -> None:
    """Add this room's subcommands to the ``alcot`` parser."""
    p = sub.add_parser("analyze", help="plots, fits and a report for a study's MLflow runs")
    p.add_argument("--experiment", required=True, help="the MLflow experiment (a sweep's study)")
    p.add_argument("--sweep", default=None, help="only the runs of this sweep id")
    p.add_argument("--out", required=True, help="folder for the report and plots")
    p.add_argument(
        "--flops",
        choices=["realised", "nominal", "paper"],
        default="realised",
        help="compute axis: realised (executed work), nominal (6 x non-embedding params x "
        "passes), paper (6 x all params x passes, the paper's table)",
    )
    add_fit_options(p, "which evaluations L(C) is fitted to (default: each method's envelope)")
    p.add_argument("--target-ppl", type=float, default=None, help="target for compute ratios")
    p.add_argument("--no-log", action="store_true", help="do not log the report to MLflow")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("study", help="the study's claims report, and its portable export")
    ssub = p.add_subparsers(dest="study_command", metavar="COMMAND")
    q = ssub.add_parser("export", help="an experiment's runs as one gzipped JSON file")
    q.add_argument("--experiment", required=True)
    q.add_argument("--out", required=True, help="the file to write (.json.gz)")
    q.add_argument("--tracking-uri", default=None, help="MLflow store (default: ALCOT_HOME's)")
    q.set_defaults(func=cmd_study_export)
    q = ssub.add_parser(
        "report", help="analysis report plus the R1-R5 tables, from MLflow or an export"
    )
    src = q.add_mutually_exclusive_group(required=True)
    src.add_argument("--experiment", help="read this experiment from the MLflow store")
    src.add_argument(
        "--from", dest="from_export", help="rebuild from an export (a fresh temporary store)"
    )
    q.add_argument("--out", required=True, help="folder for the report, tables and plots")
    add_fit_options(q, "which evaluations L(C) is fitted to (as alcot analyze)")
    q.set_defaults(func=cmd_study_report)
