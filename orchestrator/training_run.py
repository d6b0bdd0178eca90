"""One training run from a RunConfig: data preparation, the trainer, and MLflow tracking.

This is the unit a sweep schedules: config in, metrics out (and an MLflow run).

The run's records beyond the trainer's own checkpoints are callbacks passed to ``train()``
(``alcot.model.trainer.Callback``), not code around it, so that each is written at the phase it
belongs to and the trainer stays free of MLflow: :class:`TrackMetrics` (each reported step into
the tracker), :class:`TrackResult` (at the end: the run's tags and model, the plot of the last
validation's depths, the token-depth samples as an artifact) and :class:`TokenDepthExport` (the
per-token depth samples, written with or without tracking). The tracker's life (created before
training, finished or abandoned after it, whatever happened) stays here, in ``_train_claimed``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from alcot.common.files import atomic_write
from alcot.model import checkpoints
from alcot.model.config import count_parameters
from alcot.model.diagnostics import has_token_depth, write_token_depth
from alcot.model.trainer import Callback, TrainResult, TrainState, train
from alcot.orchestrator.config import RunConfig, alcot_home, config_hash, flatten, run_dir
from alcot.orchestrator.tracking.lease import Lease, LeaseLost
from alcot.orchestrator.tracking.run_folder import last_metrics, read_status
from alcot.orchestrator.tracking.stores import resolve_uri
from alcot.orchestrator.tracking.tracker import Delivery, Tracker, deliver


@dataclass
class RunOutcome:
    result: TrainResult
    run_id: str | None
    tracking_uri: str | None
    out_dir: Path
    config_hash: str
    all_metrics_sent: bool = True  # everything journalled is in MLflow, status included
    owed: Delivery = field(default_factory=Delivery)  # what is not (yet)


def git_commit() -> str:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def layout_params(m) -> dict[str, object]:
    """The process layout as MLflow params: tensor x pipeline x data parallel."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))
    tp, pp = m.tensor_parallel_size, m.pipeline_parallel_size
    dp = max(1, world // (tp * pp))
    return {
        "parallel.tensor": tp,
        "parallel.pipeline": pp,
        "parallel.data": dp,
        "parallel.layout": f"tp{tp} x pp{pp} x dp{dp}",
    }


def resolve(cfg: RunConfig, vocab_size: int) -> RunConfig:
    """The config as trained: the model's vocabulary padded from the tokenizer's."""
    multiple = 64 * cfg.model.tensor_parallel_size
    padded = -(-vocab_size // multiple) * multiple
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=padded))


def settle_matplotlib() -> None:
    """Draw and save one empty figure, on this thread, before the tracker's delivery thread starts.

    Each matplotlib canvas class looks IPython up in ``sys.modules`` the first time one is made
    (once per class and process: the check is cached). ``mlflow.start_run`` on the delivery
    thread imports IPython (its notebook context), and a canvas made while that import is half
    done read a partial module and failed the run, in CI, twice. Doing the check here, before
    any second thread exists, leaves nothing for later figures to race on."""
    import io

    from matplotlib.figure import Figure

    Figure(figsize=(1, 1)).savefig(io.BytesIO(), format="png")


def depth_histogram_plot(hist: list[float], path: Path, title: str) -> Path:
    # A Figure of its own, not pyplot (whose state is process-wide); settle_matplotlib() ran at
    # the start of the run, so the canvas made here does not look at a half-imported IPython.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.2))
    ax = fig.subplots()
    ax.bar(range(len(hist)), hist, color="#3b6ea8")
    ax.set_xlabel("executed latent steps K_t")
    ax.set_ylabel("fraction of validation tokens")
    ax.set_xticks(range(len(hist)))
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def run_training(
    cfg: RunConfig,
    progress: bool = True,
    log=print,
    extra_tags: dict[str, str] | None = None,
    lease: bool = True,
) -> RunOutcome:
    """Train one run. ``extra_tags`` (e.g. a sweep's parent run) go on its MLflow run.

    Order matters for the records: the data is read and validated first, so that bad input is a
    ConfigError before any MLflow run exists; then the run folder is claimed (``lease``: one
    live process per folder; a second one waits, then finds the work done or continues it);
    then the MLflow run is found or created, and only failures from here on leave a FAILED run.
    Gang trials pass ``lease=False``: their driver-side process holds the lease for all ranks.
    """
    import torch.distributed as dist

    from alcot.data.preparation import check_enough, prepare

    home = alcot_home()
    h = config_hash(cfg)
    out_dir = run_dir(cfg, home)
    # under torchrun the process group is set up later (in train()): the launcher's RANK tells
    is_rank0 = (dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))) == 0
    data = prepare(cfg.data, cfg.data.cache_dir or home / "cache", log=log)
    check_enough(cfg.data, data)
    if data.cache_hit:
        log(f"token cache hit: {data.root}")
    resolved = resolve(cfg, data.vocab_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    if is_rank0 and data.tokenizer_path:  # the run folder holds what evaluation needs
        keep_tokenizer(data.tokenizer_path, out_dir)
    claim = Lease(out_dir, label=f"training {h[:10]}") if lease and is_rank0 else None
    if claim is not None:
        claim.acquire(log=log)
    try:
        return _train_claimed(
            cfg, resolved, data, h, out_dir, is_rank0, progress, log, extra_tags, claim
        )
    finally:
        if claim is not None:
            claim.release()


def _train_claimed(cfg, resolved, data, h, out_dir, is_rank0, progress, log, extra_tags, claim):
    """Train a claimed folder. Every write to it (journal line, checkpoint, artifact, MLflow
    call, final status) is fenced by ``claim.check``: once another process has taken the
    folder over, this one raises LeaseLost before its next write and leaves it alone."""
    import torch.distributed as dist

    home = alcot_home()
    m = cfg.model
    settle_matplotlib()
    tracker, uri = None, None
    resume_from = (
        checkpoints.latest_valid(out_dir / "checkpoints") if cfg.train.resume == "auto" else None
    )
    if (
        resume_from is not None
        and resume_from.step >= cfg.train.steps
        and read_status(out_dir) == "FINISHED"
    ):
        return _finished_before(cfg, out_dir, h, resume_from, log, extra_tags, is_rank0, claim)
    if cfg.train.resume == "never" and is_rank0:
        set_aside_records(out_dir, log)
    settings = resolved.to_dict()
    fence = claim.check if claim is not None else None
    if cfg.tracking.enabled and is_rank0:
        from alcot.orchestrator.tracking import metadata

        uri, artifact_root = resolve_uri(cfg.tracking.uri, home)
        params = flatten(settings)
        counts = count_parameters(resolved.model)
        params.update({f"params.{k}": v for k, v in counts.items()})
        params.update(layout_params(m))
        tracker = Tracker(
            uri,
            cfg.tracking.experiment,
            out_dir,
            run_name=cfg.tracking.run_name or metadata.run_name(m, h),
            artifact_root=artifact_root,
            tags={
                "config_hash": h,
                "git_commit": git_commit(),
                "method": m.method,
                "size": m.size,
                "alcot.out_dir": str(out_dir),
                "alcot.world_size": str(
                    dist.get_world_size()
                    if dist.is_initialized()
                    else int(os.environ.get("WORLD_SIZE", 1))
                ),
                **metadata.start_tags(cfg, extra_tags),
                **(extra_tags or {}),
            },
            flush_seconds=cfg.tracking.flush_seconds,
            log=log,
            params=params,
            fence=fence,
            writer=claim.generation if claim is not None else None,
            replay_from=resume_from.step if resume_from is not None else None,
        )
        where = f"run {tracker.run_id}" if tracker.run_id else "a run (created when it answers)"
        log(f"MLflow {where} (experiment {cfg.tracking.experiment!r}, store {uri})")

    status = "FAILED"
    result = None
    # the records of the run, in the order they are made at each phase: the token-depth samples
    # are written before the tracker's end-of-run records log them
    callbacks: list[Callback] = [TokenDepthExport(fence)]
    track = None
    if tracker is not None:
        track = TrackResult(tracker, cfg, settings, out_dir, fence)
        callbacks += [TrackMetrics(tracker), track]
    try:
        if fence is not None:
            fence()
        (out_dir / "config.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
        if tracker is not None:
            tracker.log_artifact(out_dir / "config.yaml")
            if not tracker.resumed:  # the dataset input, once per run
                metadata.on_data(tracker, cfg.data, data)
        result = train(
            resolved.model,
            data,
            cfg.train,
            cfg.seed,
            out_dir,
            cfg.data.seq_len,
            callbacks=callbacks,
            run_meta={"config_hash": h},
            progress=progress,
            log=log,
            resume_from=resume_from,
            fence=fence,
        )
        status = "FINISHED" if result.status == "finished" else "FAILED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except LeaseLost:
        status = None  # another process has the folder: nothing more is written here
        if tracker is not None:
            tracker.abandon()
        log("stopped: this process lost the run folder's lease (see the error)")
        raise
    except Exception as err:
        if track is not None and track.status is not None:
            status = track.status  # training ended so; what failed is a record after it
        if tracker is not None:
            tracker.set_tag("alcot.error", f"{type(err).__name__}: {err}")
        raise
    finally:
        if status is None:
            pass
        elif tracker is not None:
            tracker.finish(status)
        elif is_rank0:
            if fence is not None:
                fence()
            (out_dir / "run_status.json").write_text(json.dumps({"status": status}))
    owed = tracker.owed if tracker else Delivery()
    run_id = tracker.run_id if tracker else None
    return RunOutcome(result, run_id, uri, out_dir, h, owed.complete, owed)


class TrackMetrics(Callback):
    """Each reported step's metrics into the run's tracker (its journal, then MLflow), as one
    row, with the scaling view's extra metric (``metadata.scaling_metrics``)."""

    def __init__(self, tracker: Tracker):
        from alcot.orchestrator.tracking.metadata import scaling_metrics

        self.tracker, self.row = tracker, scaling_metrics

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        self.tracker.on_metrics(step, self.row(metrics))


class TrackResult(Callback):
    """The end of training in the run's tracker: a failed run's error tag, or a finished run's
    description and model (``metadata.on_finished``); the executed-depth distribution of the
    last validation as a plot (kept at each ``on_eval``); the token-depth samples, if written.

    ``status`` is what training ended with (FINISHED or FAILED), set before these records are
    made: a record that then fails adds an error tag but leaves the status training earned."""

    def __init__(self, tracker: Tracker, cfg: RunConfig, settings: dict, out_dir: Path, fence):
        self.tracker, self.cfg, self.settings = tracker, cfg, settings
        self.out_dir, self.fence = out_dir, fence
        self.histogram: list[float] = []
        self.status: str | None = None

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        depths = range(self.cfg.model.l_max + 1)
        self.histogram = [metrics[f"val/depth_frac_{k}"] for k in depths]

    def on_train_end(self, result: TrainResult) -> None:
        from alcot.orchestrator.tracking import metadata

        self.status = "FINISHED" if result.status == "finished" else "FAILED"
        if result.status != "finished":
            self.tracker.set_tag("alcot.error", result.message)
        else:
            metadata.on_finished(
                self.tracker, self.cfg, self.settings, result, self.cfg.tracking.log_model
            )
        if self.histogram:
            if self.fence is not None:
                self.fence()
            m = self.cfg.model
            plot = depth_histogram_plot(
                self.histogram,
                self.out_dir / "depth_histogram.png",
                f"{m.method} {m.size}: executed depth at step {result.step}",
            )
            self.tracker.log_artifact(plot)
        if result.token_depth:
            self.tracker.log_artifact(result.token_depth, "diagnostics")


class TokenDepthExport(Callback):
    """At the end of a finished run of a method whose tokens halt at different depths
    (adaptive, Mixture-of-Recursions): (step-0 loss, executed depth) for a sample of validation
    tokens into ``token_depth.csv`` and ``result.token_depth`` (what analysis reads, METHOD.md
    claim 4). Every rank runs the forward (with a sharded model it is a collective); rank 0
    writes the file, after the fence."""

    def __init__(self, fence=None):
        self.fence = fence
        self.state: TrainState | None = None

    def on_train_start(self, state: TrainState) -> None:
        self.state = state

    def on_train_end(self, result: TrainResult) -> None:
        s = self.state
        if result.status != "finished" or not has_token_depth(s.model_cfg):
            return
        batches = s.data.eval_batches(s.seq_len, s.micro, s.tcfg.eval_batches)
        if self.fence is not None:
            self.fence()
        path = s.out_dir / "token_depth.csv"
        result.token_depth = write_token_depth(s.model, batches, path, write=s.rank == 0)


def keep_tokenizer(src: Path, out_dir: Path) -> None:
    """Copy the token cache's ``tokenizer.json`` into the run folder (atomically, once)."""
    dest = out_dir / "tokenizer.json"
    data = Path(src).read_bytes()
    if dest.exists() and dest.read_bytes() == data:
        return
    atomic_write(dest, data)


RECORDS = ("metrics.jsonl", "tracking.json", "artifacts.json", "params.json", "run_status.json")


def set_aside_records(out_dir: Path, log) -> None:
    """``train.resume: never`` trains the folder from scratch as a new MLflow run: the earlier
    records move to ``previous/<time>/`` (kept, not mixed with the new ones)."""
    present = [name for name in RECORDS if (out_dir / name).exists()]
    if not present:
        return
    dest = out_dir / "previous" / time.strftime("%Y%m%d-%H%M%S")
    dest.mkdir(parents=True, exist_ok=True)
    for name in present:
        os.replace(out_dir / name, dest / name)
    log(f"train.resume is never: the folder's earlier records are in {dest}")


def _finished_before(cfg, out_dir, h, info, log, extra_tags, is_rank0, claim=None) -> RunOutcome:
    """The folder holds a finished training (another invocation ran it while this one waited,
    or a sweep was resubmitted): deliver what its MLflow run lacks, train nothing."""
    log(f"{out_dir}: already trained to step {info.step}; not training again")
    metrics, step = last_metrics(out_dir)
    result = TrainResult("finished", step, metrics, checkpoint=info.path)
    owed, uri, run_id = Delivery(), None, None
    if cfg.tracking.enabled and is_rank0:
        uri, _ = resolve_uri(cfg.tracking.uri, alcot_home())
        fence = claim.check if claim is not None else None
        owed = deliver(out_dir, uri, tags=extra_tags, log=log, fence=fence)
        run_id = owed.run_id
    return RunOutcome(result, run_id, uri, out_dir, h, owed.complete, owed)
