"""``alcot ui`` (the MLflow UI on the local store) and ``alcot tracking sync``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def ui_hint(uri: str | None) -> str:
    from alcot.orchestrator.config import alcot_home
    from alcot.orchestrator.tracking.stores import default_store

    if uri and uri == default_store(alcot_home())[0]:
        return "alcot ui   (then open http://127.0.0.1:5000)"
    return f"mlflow ui --backend-store-uri {uri}"


def cmd_ui(args: argparse.Namespace) -> int:
    import os
    import shutil

    from alcot.orchestrator.config import alcot_home
    from alcot.orchestrator.tracking.stores import default_store

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
    from alcot.common.typed import ConfigError
    from alcot.orchestrator.tracking.tracker import sync

    try:
        owed = sync(args.run_dir)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0 if owed == 0 else 1


def add_parsers(sub) -> None:
    """Add this room's subcommands to the ``alcot`` parser."""
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
