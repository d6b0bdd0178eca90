"""``alcot sweep run|submit|status|logs``: sweeps on the embedded Ray, a cluster or Slurm."""

from __future__ import annotations

import argparse
import sys


def _load_sweep(path: str, overrides: list[str] | None = None):
    from alcot.common.typed import ConfigError
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
    from alcot.common.typed import ConfigError

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


AGENT_WAIT_S = 30.0  # how long a submission waits for a freshly started cluster's job agent


class NoJobAgent(RuntimeError):
    """The cluster's head has no dashboard agent to run jobs."""


def _submit(client, wait_s: float = AGENT_WAIT_S, **job) -> str:
    """``client.submit_job(**job)``, retried while the cluster answers that no job agent is
    available (a head started seconds ago answers before its agent has registered), for at
    most ``wait_s`` seconds; then :class:`NoJobAgent` with the likely cause."""
    import time

    deadline = time.monotonic() + wait_s
    delay = 0.5
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as err:
            if "No available agent" not in str(err):
                raise
            if time.monotonic() + delay > deadline:
                raise NoJobAgent(
                    "the cluster has no job agent to run the sweep (Ray: 'No available agent "
                    "to submit job'). The head's dashboard agent listens on one port, "
                    "--dashboard-agent-listen-port (52365 unless set), and does not run when "
                    "another Ray on that machine holds it: start the head with a free port "
                    "there, or stop the other Ray"
                ) from err
            print(f"the cluster has no job agent yet; retrying in {delay:g} s", file=sys.stderr)
            time.sleep(delay)
            delay = min(2 * delay, 5.0)


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
    try:
        job_id = _submit(
            _jobs_client(args.address),
            entrypoint=f"alcot sweep run {rel} --address auto",
            runtime_env={
                "working_dir": ".",
                "excludes": [".venv", ".git", ".alcot", "__pycache__", "*.pyc"],
                "env_vars": env,
            },
        )
    except NoJobAgent as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
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


def add_parsers(sub) -> None:
    """Add this room's subcommands to the ``alcot`` parser."""
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
