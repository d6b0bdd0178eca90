"""One training run from a RunConfig: data preparation, the trainer, and MLflow tracking.

This is the unit a sweep schedules: config in, metrics out (and an MLflow run).
"""

from __future__ import annotations

import dataclasses
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from alcot.model import checkpointing
from alcot.model.config import count_parameters
from alcot.model.training import TrainResult, train

from .config import RunConfig, alcot_home, config_hash, flatten, run_dir
from .tracking import Tracker, read_record, resolve_uri


@dataclass
class RunOutcome:
    result: TrainResult
    run_id: str | None
    tracking_uri: str | None
    out_dir: Path
    config_hash: str
    all_metrics_sent: bool = True


def git_commit() -> str:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def resolve(cfg: RunConfig, vocab_size: int) -> RunConfig:
    """The config as trained: the model's vocabulary padded from the tokenizer's."""
    multiple = 64 * cfg.model.tensor_parallel_size
    padded = -(-vocab_size // multiple) * multiple
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=padded))


def depth_histogram_plot(hist: list[float], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(range(len(hist)), hist, color="#3b6ea8")
    ax.set_xlabel("executed latent steps K_t")
    ax.set_ylabel("fraction of validation tokens")
    ax.set_xticks(range(len(hist)))
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def previous_run_id(
    out_dir: Path, uri: str, info: checkpointing.CheckpointInfo | None
) -> str | None:
    """The MLflow run an interrupted run of this folder was logging to, if any.

    Taken from the newest valid checkpoint (``info``), or, when it was stopped before its first
    checkpoint, from ``tracking.json``: training then restarts from step 0, reproduces the same
    values, and the tracker does not log the steps the run already has.
    """
    if info is not None and info.meta.get("mlflow_run_id"):
        return info.meta["mlflow_run_id"]
    try:
        data = read_record(out_dir)
    except ValueError:  # a torn record: start a new run
        return None
    if data and data.get("uri") == uri:
        return data.get("run_id")
    return None


def run_training(
    cfg: RunConfig, progress: bool = True, log=print, extra_tags: dict[str, str] | None = None
) -> RunOutcome:
    """Train one run. ``extra_tags`` (e.g. a sweep's parent run) go on its MLflow run.

    The MLflow run is opened first, so that a run that fails early (a missing data file) is
    still recorded as FAILED, with the error as its ``alcot.error`` tag.
    """
    import torch.distributed as dist

    from alcot.data.prepare import prepare

    home = alcot_home()
    h = config_hash(cfg)
    out_dir = run_dir(cfg, home)
    out_dir.mkdir(parents=True, exist_ok=True)
    is_rank0 = not dist.is_initialized() or dist.get_rank() == 0
    tracker, uri, run_id = None, None, None
    m = cfg.model
    resume_from = (
        checkpointing.latest_valid(out_dir / "checkpoints") if cfg.train.resume == "auto" else None
    )
    if cfg.tracking.enabled and is_rank0:
        from . import mlflow_meta

        uri, artifact_root = resolve_uri(cfg.tracking.uri, home)
        if cfg.train.resume == "auto":
            run_id = previous_run_id(out_dir, uri, resume_from)
        tracker = Tracker(
            uri,
            cfg.tracking.experiment,
            out_dir,
            run_name=cfg.tracking.run_name or mlflow_meta.run_name(m, h),
            run_id=run_id,
            artifact_root=artifact_root,
            tags={
                "config_hash": h,
                "git_commit": git_commit(),
                "method": m.method,
                "size": m.size,
                "alcot.out_dir": str(out_dir),
                "alcot.world_size": str(dist.get_world_size() if dist.is_initialized() else 1),
                **mlflow_meta.start_tags(cfg, extra_tags),
                **(extra_tags or {}),
            },
            flush_seconds=cfg.tracking.flush_seconds,
            log=log,
        )
        log(f"MLflow run {tracker.run_id} (experiment {cfg.tracking.experiment!r}, store {uri})")

    status = "FAILED"
    result = None
    try:
        data = prepare(cfg.data, cfg.data.cache_dir or home / "cache", log=log)
        if data.cache_hit:
            log(f"token cache hit: {data.root}")
        resolved = resolve(cfg, data.vocab_size)
        settings = resolved.to_dict()
        (out_dir / "config.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
        if tracker is not None and not tracker.resumed:  # a new run: its params and config
            params = flatten(settings)
            counts = count_parameters(resolved.model)
            params.update({f"params.{k}": v for k, v in counts.items()})
            tracker.log_params(params)
            tracker.log_artifact(out_dir / "config.yaml")
            mlflow_meta.on_data(tracker, cfg.data, data)
        result = train(
            resolved.model,
            data,
            cfg.train,
            cfg.seed,
            out_dir,
            cfg.data.seq_len,
            callbacks=[tracker] if tracker else [],
            run_meta={"mlflow_run_id": tracker.run_id if tracker else run_id, "config_hash": h},
            progress=progress,
            log=log,
            resume_from=resume_from,
        )
        status = "FINISHED" if result.status == "finished" else "FAILED"
        if tracker is not None and result.status != "finished":
            tracker.set_tag("alcot.error", result.message)
        elif tracker is not None:
            mlflow_meta.on_finished(tracker, cfg, settings, result, cfg.tracking.log_model)
        if result.depth_histogram and tracker:
            plot = depth_histogram_plot(
                result.depth_histogram,
                out_dir / "depth_histogram.png",
                f"{m.method} {m.size}: executed depth at step {result.step}",
            )
            tracker.log_artifact(plot)
        if result.token_depth and tracker:
            tracker.log_artifact(result.token_depth, "diagnostics")
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except Exception as err:
        if tracker is not None:
            tracker.set_tag("alcot.error", f"{type(err).__name__}: {err}")
        raise
    finally:
        sent = tracker.finish(status) if tracker else True
    run_id = tracker.run_id if tracker else run_id
    return RunOutcome(result, run_id, uri, out_dir, h, sent)
