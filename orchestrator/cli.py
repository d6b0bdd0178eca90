"""The ``alcot`` command. Each subcommand parses its arguments and calls into the library."""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


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


def cmd_train(args: argparse.Namespace) -> int:
    from alcot.model.typed import ConfigError
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
    from alcot.data.preparation import check_enough, prepare
    from alcot.model.typed import ConfigError
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


def ui_hint(uri: str | None) -> str:
    from alcot.orchestrator.config import alcot_home
    from alcot.orchestrator.tracking.tracker import default_store

    if uri and uri == default_store(alcot_home())[0]:
        return "alcot ui   (then open http://127.0.0.1:5000)"
    return f"mlflow ui --backend-store-uri {uri}"


def cmd_ui(args: argparse.Namespace) -> int:
    import os
    import shutil

    from alcot.orchestrator.config import alcot_home
    from alcot.orchestrator.tracking.tracker import default_store

    uri, artifacts = default_store(alcot_home())
    uri = args.backend_store_uri or os.environ.get("MLFLOW_TRACKING_URI") or uri
    mlflow = shutil.which("mlflow", path=os.path.dirname(sys.executable)) or "mlflow"
    cmd = [
        mlflow,
        "ui",
        "--backend-store-uri",
        uri,
        "--default-artifact-root",
        artifacts,
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--workers",
        "1",
    ]
    from alcot.orchestrator.tracking.metadata import UI_HOME

    base = f"http://{args.host}:{args.port}"
    print(f"MLflow UI for {uri} at {base}{UI_HOME} (Ctrl-C to stop)", flush=True)
    views = _experiment_views(uri)
    if views:
        print(
            "experiments (runs by validation perplexity, key settings and metrics; charts: "
            "perplexity vs FLOPs, Pareto, parallel coordinates):"
        )
    for name, path, charts in views:
        print(f"  {name}: {base}{path}", flush=True)
        print(f"  {name} charts: {base}{charts}", flush=True)
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    return os.spawnve(os.P_WAIT, cmd[0], cmd, env) if os.path.isabs(cmd[0]) else 1


def _experiment_views(uri: str) -> list[tuple[str, str, str]]:
    """(experiment, UI routes of alcot's saved view: runs table, charts) for the store's alcot
    experiments: runs sorted by validation perplexity, key settings and final metrics as
    columns; the scaling study's charts."""
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).exists():
        return []
    try:
        from mlflow.tracking import MlflowClient

        from alcot.orchestrator.tracking.metadata import (
            EXPERIMENT_KIND_TAG,
            VIEW_KEY,
            VIEW_TAG_PREFIX,
            ui_path,
        )

        exps = MlflowClient(uri).search_experiments()
    except Exception:  # the UI still starts; the store may be unreadable until then
        return []
    return [
        (e.name, ui_path(e.experiment_id), ui_path(e.experiment_id, charts=True))
        for e in exps
        if EXPERIMENT_KIND_TAG in e.tags and VIEW_TAG_PREFIX + VIEW_KEY in e.tags
    ]


def cmd_tracking_sync(args: argparse.Namespace) -> int:
    from alcot.model.typed import ConfigError
    from alcot.orchestrator.tracking.tracker import sync

    try:
        owed = sync(args.run_dir)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0 if owed == 0 else 1


def _load_sweep(path: str, overrides: list[str] | None = None):
    from alcot.model.typed import ConfigError
    from alcot.orchestrator.sweeps.spec import SweepError, load_sweep

    try:
        return load_sweep(path, overrides or [])
    except (SweepError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return None


def cmd_sweep_run(args: argparse.Namespace) -> int:
    if args.sbatch and not args.slurm:
        print("error: --sbatch only goes with --slurm", file=sys.stderr)
        return 2
    if args.slurm and args.address:
        print("error: --slurm starts its own Ray cluster; drop --address", file=sys.stderr)
        return 2
    sweep = _load_sweep(args.sweep, args.set)
    if sweep is None:
        return 2
    if args.slurm:
        from alcot.orchestrator.sweeps.slurm import SlurmError, submit

        try:
            return submit(args.sweep, args.set, args.sbatch, dry_run=args.dry_run)
        except SlurmError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    from alcot.model.typed import ConfigError

    if sweep.spec.search is not None:
        from alcot.orchestrator.sweeps.search import run_search as run
    else:
        from alcot.orchestrator.sweeps.runner import run_sweep as run
    try:
        return run(sweep, address=args.address, dry_run=args.dry_run, log=print)
    except ConfigError as err:  # e.g. a tracking store that cannot be reached
        print(f"error: {err}", file=sys.stderr)
        return 2


def _jobs_client(address: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def cmd_sweep_submit(args: argparse.Namespace) -> int:
    import os

    sweep = _load_sweep(args.sweep)  # validate here, before anything is shipped
    if sweep is None:
        return 2
    rel = os.path.relpath(os.path.abspath(args.sweep), os.getcwd())
    if rel.startswith(".."):
        print(
            "error: the sweep file must be inside the working directory that is shipped",
            file=sys.stderr,
        )
        return 2
    env = {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI", "ALCOT_HOME") if k in os.environ}
    job_id = _jobs_client(args.address).submit_job(
        entrypoint=f"alcot sweep run {rel} --address auto",
        runtime_env={
            "working_dir": ".",
            "excludes": [".venv", ".git", ".alcot", "__pycache__", "*.pyc"],
            "env_vars": env,
        },
    )
    print(f"submitted job {job_id}")
    print(f"follow it with: alcot sweep status {job_id} --address {args.address}")
    print(f"             or: alcot sweep logs {job_id} --address {args.address} --follow")
    return 0


def cmd_sweep_status(args: argparse.Namespace) -> int:
    status = _jobs_client(args.address).get_job_status(args.job_id)
    print(str(status.value if hasattr(status, "value") else status))
    return 0


def cmd_sweep_logs(args: argparse.Namespace) -> int:
    client = _jobs_client(args.address)
    if args.follow:
        import asyncio

        async def tail():
            async for chunk in client.tail_job_logs(args.job_id):
                print(chunk, end="", flush=True)

        asyncio.run(tail())
    else:
        print(client.get_job_logs(args.job_id), end="")
    return 0


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


def cmd_diagnose(args: argparse.Namespace) -> int:
    from alcot.model.typed import ConfigError
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

    from alcot.model.typed import ConfigError
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
        tmp = out / (name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in items))
        tmp.replace(out / name)
    keys = ("step", "depth", "ce", "router/share", "router/cosine", "backbone/share")
    print(" ".join(f"{k:>14s}" for k in keys + ("k0/dce_dg", "k0/dadapt_dg", "k0/gate")))
    for r in rows:
        vals = [r.get(k, float("nan")) for k in keys + ("k0/dce_dg", "k0/dadapt_dg", "k0/gate")]
        print(" ".join(f"{v:14.5g}" for v in vals))
    print(f"wrote {out / 'probe.jsonl'} and {out / 'train.jsonl'}")
    return 0


def cmd_study_export(args: argparse.Namespace) -> int:
    from alcot.analysis.load import AnalysisError
    from alcot.analysis.study import export_runs

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

    p = sub.add_parser("sweep", help="run, submit and follow sweeps (YAML) on Ray")
    ssub = p.add_subparsers(dest="sweep_command", metavar="COMMAND")
    q = ssub.add_parser("run", help="run a sweep (embedded local Ray, or --address)")
    q.add_argument("sweep")
    q.add_argument("--dry-run", action="store_true", help="print the plan, launch nothing")
    q.add_argument("--address", default=None, help="an existing Ray cluster (e.g. auto)")
    q.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a base config value for every trial (repeatable)",
    )
    q.add_argument(
        "--slurm",
        action="store_true",
        help="submit it as a Slurm batch job (infra/slurm/alcot-sweep.sbatch: Ray on the "
        "allocation's nodes, then the sweep); with --dry-run, print the sbatch command",
    )
    q.add_argument(
        "--sbatch",
        action="append",
        metavar="ARG",
        help="an sbatch option for --slurm, e.g. --sbatch=--nodes=4 (repeatable)",
    )
    q.set_defaults(func=cmd_sweep_run)
    q = ssub.add_parser("submit", help="ship this folder and run the sweep on a Ray cluster")
    q.add_argument("sweep")
    q.add_argument("--address", required=True, help="the Ray Jobs API, http://HEAD:8265")
    q.set_defaults(func=cmd_sweep_submit)
    q = ssub.add_parser("status", help="the state of a submitted sweep")
    q.add_argument("job_id")
    q.add_argument("--address", required=True)
    q.set_defaults(func=cmd_sweep_status)
    q = ssub.add_parser("logs", help="the output of a submitted sweep")
    q.add_argument("job_id")
    q.add_argument("--address", required=True)
    q.add_argument("--follow", action="store_true")
    q.set_defaults(func=cmd_sweep_logs)

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
    p.add_argument(
        "--points",
        choices=["envelope", "final", "all"],
        default="envelope",
        help="which evaluations L(C) is fitted to (default: each method's envelope)",
    )
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap replicates (0: none)")
    p.add_argument("--level", type=float, default=0.9, help="confidence level of intervals")
    p.add_argument("--target-ppl", type=float, default=None, help="target for compute ratios")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: ALCOT_HOME's)")
    p.add_argument("--no-log", action="store_true", help="do not log the report to MLflow")
    p.set_defaults(func=cmd_analyze)

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
    q.add_argument(
        "--points",
        choices=["envelope", "final", "all"],
        default="envelope",
        help="which evaluations L(C) is fitted to (as alcot analyze)",
    )
    q.add_argument("--bootstrap", type=int, default=200, help="bootstrap replicates of fits")
    q.add_argument("--level", type=float, default=0.9, help="confidence level of intervals")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--tracking-uri", default=None, help="MLflow store (default: ALCOT_HOME's)")
    q.set_defaults(func=cmd_study_report)

    p = sub.add_parser("ui", help="start the MLflow UI on the local tracking store")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--backend-store-uri", default=None)
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("tracking", help="tracking utilities")
    tsub = p.add_subparsers(dest="tracking_command", metavar="COMMAND")
    q = tsub.add_parser("sync", help="send a run's locally kept metrics to its MLflow run")
    q.add_argument("run_dir")
    q.set_defaults(func=cmd_tracking_sync)

    from alcot.orchestrator.evaluation.cli import add_parsers as add_eval_parsers

    add_eval_parsers(sub)  # eval, generate, export
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    import os

    from alcot.model.typed import ConfigError
    from alcot.orchestrator.config import check_uri_credentials

    try:  # the URI is recorded (tracking.json, Ray job env): never with a password in it
        check_uri_credentials(os.environ.get("MLFLOW_TRACKING_URI"), "MLFLOW_TRACKING_URI")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
