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

from .config import RunConfig, alcot_home, config_hash, flatten
from .tracking import Tracker, resolve_uri


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


def run_training(cfg: RunConfig, progress: bool = True, log=print) -> RunOutcome:
    from alcot.data.prepare import prepare

    home = alcot_home()
    data = prepare(cfg.data, cfg.data.cache_dir or home / "cache", log=log)
    if data.cache_hit:
        log(f"token cache hit: {data.root}")
    h = config_hash(cfg)
    resolved = resolve(cfg, data.vocab_size)
    out_dir = Path(cfg.out_dir or home / "runs" / h[:16]).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(resolved.to_dict(), sort_keys=False))

    run_id = None
    if cfg.train.resume == "auto":
        info = checkpointing.latest_valid(out_dir / "checkpoints")
        if info is not None:
            run_id = info.meta.get("mlflow_run_id")

    import torch.distributed as dist

    is_rank0 = not dist.is_initialized() or dist.get_rank() == 0
    tracker, uri = None, None
    m = resolved.model
    if cfg.tracking.enabled and is_rank0:
        uri, artifact_root = resolve_uri(cfg.tracking.uri, home)
        counts = count_parameters(resolved.model)
        params = flatten(resolved.to_dict())
        params.update({f"params.{k}": v for k, v in counts.items()})
        tracker = Tracker(
            uri,
            cfg.tracking.experiment,
            out_dir,
            run_name=cfg.tracking.run_name or f"{m.method}-{m.size}-{h[:8]}",
            run_id=run_id,
            artifact_root=artifact_root,
            tags={
                "config_hash": h,
                "git_commit": git_commit(),
                "method": m.method,
                "size": m.size,
                "alcot.out_dir": str(out_dir),
            },
            params=params,
            flush_seconds=cfg.tracking.flush_seconds,
            log=log,
        )
        if run_id is None:
            tracker.log_artifact(out_dir / "config.yaml")
        run_id = tracker.run_id
        log(f"MLflow run {run_id} (experiment {cfg.tracking.experiment!r}, store {uri})")

    status = "FAILED"
    result = None
    try:
        result = train(
            resolved.model,
            data,
            cfg.train,
            cfg.seed,
            out_dir,
            cfg.data.seq_len,
            callbacks=[tracker] if tracker else [],
            run_meta={"mlflow_run_id": run_id, "config_hash": h},
            progress=progress,
            log=log,
        )
        status = "FINISHED" if result.status == "finished" else "FAILED"
        if result.depth_histogram and tracker:
            plot = depth_histogram_plot(
                result.depth_histogram,
                out_dir / "depth_histogram.png",
                f"{m.method} {m.size}: executed depth at step {result.step}",
            )
            tracker.log_artifact(plot)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        sent = tracker.finish(status) if tracker else True
    return RunOutcome(result, run_id, uri, out_dir, h, sent)
