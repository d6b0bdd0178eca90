"""Where an evaluation's results go: the run folder (``evals/``), the run's MLflow run
(metrics and artifacts, through the folder's tracker), and, inside a sweep, a trial's evaluation
after its training (skipped when done before)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from alcot.common.files import atomic_write_json
from alcot.model import checkpoints
from alcot.orchestrator.evaluation.loading import LoadedRun, load_run
from alcot.orchestrator.evaluation.suite import (
    EvalSpec,
    metrics_of,
    run_eval,
    spec_from_section,
    table,
)


def _tracker(loaded: LoadedRun, log):
    """A Tracker on the run folder's own MLflow run (None when it was never tracked)."""
    from alcot.orchestrator.tracking.tracker import folder_tracker

    return folder_tracker(loaded.run_dir, log=log)


def log_artifacts(loaded: LoadedRun, paths: list[Path], artifact_path: str, log=print) -> None:
    """Copy ``paths`` into the run folder (``<artifact_path>/``) and log them to its run."""
    import shutil

    from alcot.orchestrator.tracking.lease import Lease
    from alcot.orchestrator.tracking.run_folder import read_status

    dest = loaded.run_dir / artifact_path
    dest.mkdir(exist_ok=True)
    kept = []
    for p in paths:
        target = dest / Path(p).name
        if Path(p).resolve() != target.resolve():
            shutil.copyfile(p, target)
        kept.append(target)
    with Lease(loaded.run_dir, label="logging artifacts") as _:
        tracker = _tracker(loaded, log)
        if tracker is None:
            log(f"{loaded.run_dir} was not tracked in MLflow: files kept in {dest}")
            return
        for p in kept:
            tracker.log_artifact(p, artifact_path)
        tracker.finish(read_status(loaded.run_dir))
        log(f"logged {len(kept)} files to MLflow run {tracker.run_id} ({artifact_path}/)")


def record(loaded: LoadedRun, result: dict, log=print) -> Path:
    """Keep the result in the run folder (``eval/<time>-<key>.json``) and deliver it to the
    run's MLflow entry through the folder's journal (metrics at the checkpoint's step, the
    JSON as an artifact under ``eval/``). Returns the JSON's path."""
    return keep_result(
        loaded, result, "eval", result["spec_key"], metrics_of(result), "evaluation", log, True
    )


def keep_result(
    loaded: LoadedRun,
    result: dict,
    folder: str,
    name: str,
    metrics: dict[str, float],
    label: str,
    log=print,
    artifact: bool = False,
) -> Path:
    """Keep ``result`` (with its ``time`` and ``step``) as ``<folder>/<time>-<name>.json`` in
    the run folder, written whole or not at all, then, holding the folder's lease (``label``
    names the holder), deliver ``metrics`` at the result's step to the run's MLflow entry
    through the folder's journal, with the JSON as an artifact under ``<folder>/`` when
    ``artifact``. A folder never tracked keeps the file only. Returns the JSON's path."""
    from alcot.orchestrator.tracking.lease import Lease
    from alcot.orchestrator.tracking.run_folder import read_record, read_status

    out = loaded.run_dir / folder
    out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(result["time"]))
    path = out / f"{stamp}-{name}.json"
    atomic_write_json(path, result, indent=1)
    if read_record(loaded.run_dir) is None:
        log(f"{loaded.run_dir} was not tracked in MLflow: results kept in {path}")
        return path
    claim = Lease(loaded.run_dir, label=label)
    claim.acquire(log=log)
    try:
        tracker = _tracker(loaded, log)
        tracker.on_metrics(result["step"], metrics)
        if artifact:
            tracker.log_artifact(path, folder)
        tracker.finish(read_status(loaded.run_dir))
        if tracker.run_id:
            log(f"results logged to MLflow run {tracker.run_id} (and kept in {path})")
    finally:
        claim.release()
    return path


def done_before(run_dir: Path, spec: EvalSpec) -> Path | None:
    """The result file of an earlier evaluation of the run's newest checkpoint with the same
    spec, if there is one."""
    info = checkpoints.latest_valid(Path(run_dir) / "checkpoints")
    if info is None:
        return None
    for path in sorted((Path(run_dir) / "eval").glob(f"*-{spec.key()}.json"), reverse=True):
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if old.get("step") == info.step and old.get("spec_key") == spec.key():
            return path
    return None


def evaluate_trial(run_dir: Path, section: dict, log=print) -> Path:
    """A sweep trial's evaluation after its training: skipped when the same evaluation of the
    same checkpoint is already in the run folder (a resubmitted sweep)."""
    spec = spec_from_section(section)
    before = done_before(run_dir, spec)
    if before is not None:
        log(f"evaluation already done: {before}")
        return before
    loaded = load_run(run_dir)
    result = run_eval(loaded, spec, log=log)
    log(table(result))
    return record(loaded, result, log=log)
