"""``alcot sweep run SWEEP --slurm``: submit ``infra/slurm/alcot-sweep.sbatch`` for a sweep.

The batch script starts a Ray head on the allocation's first node and workers on the others,
runs ``alcot sweep run SWEEP --address HEAD:PORT`` there and tears Ray down. This module only
builds and runs the ``sbatch`` command; the sweep is validated locally first (by the caller), so
a malformed sweep never waits in the queue.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "infra" / "slurm" / "alcot-sweep.sbatch"


class SlurmError(Exception):
    pass


def sbatch_command(
    sweep_path: str | Path,
    overrides: list[str] | None = None,
    sbatch_args: list[str] | None = None,
    script: Path = SCRIPT,
) -> list[str]:
    """The ``sbatch`` command line that runs the sweep (paths absolute, so it runs the same
    from any submit directory)."""
    if not script.is_file():
        raise SlurmError(
            f"{script} not found: --slurm needs a source checkout of alcot "
            "(pip install -e .), whose infra/slurm/ holds the batch script"
        )
    sweep = Path(sweep_path).resolve()
    cmd = ["sbatch", "--parsable", *(sbatch_args or []), str(script), str(sweep)]
    for item in overrides or []:
        cmd += ["--set", item]
    return cmd


def submit(
    sweep_path: str | Path,
    overrides: list[str] | None = None,
    sbatch_args: list[str] | None = None,
    dry_run: bool = False,
    log=print,
) -> int:
    """Submit the sweep as a Slurm batch job; returns the exit code (0 when submitted)."""
    cmd = sbatch_command(sweep_path, overrides, sbatch_args)
    if dry_run:
        log("would submit: " + shlex.join(cmd))
        return 0
    if shutil.which("sbatch") is None:
        raise SlurmError("sbatch not found: run this on a Slurm login node")
    env = dict(os.environ, ALCOT_ROOT=str(SCRIPT.parents[2]))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    if res.returncode != 0:
        raise SlurmError(f"sbatch failed ({res.returncode}): {res.stderr.strip()}")
    job_id = res.stdout.strip().split(";")[0]
    outputs = [a.split("=", 1)[1] for a in sbatch_args or [] if a.startswith("--output=")]
    out = outputs[-1].replace("%j", job_id) if outputs else f"alcot-sweep-{job_id}.out"
    log(f"submitted Slurm job {job_id}")
    log(f"follow it with: squeue -j {job_id}   and   tail -f {out}")
    return 0
