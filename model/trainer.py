"""The trainer: config in, metrics out.

``train()`` reads top to bottom, one comment per phase: build the run (:func:`build_state`:
process groups, seeds, the model, the optimizer's groups, the schedule, the data loader),
continue it from a checkpoint (:func:`resume`), wrap it for data parallelism
(:func:`wrap_data_parallel`), then loop: :func:`train_step` takes one optimizer step, and after
it the loop reads the metrics (:func:`read_metrics`), validates (:func:`validate`) and saves a
checkpoint (:func:`save_checkpoint`) when each is due. The step is a function of its own so that
what one step does can be read (and timed) apart from when the loop does the rest.

The trainer knows nothing of MLflow or Ray. What else a run does at these moments (the
orchestrator's tracking, plots and exports, a diagnosis's probe rows, a test's record) is a
:class:`Callback` passed to ``train()``: it can be added or removed without touching the loop,
and the loop stays the same for every caller. The hooks, in the order a run calls them (the base
class's do nothing; a callback overrides the ones it needs):

* ``on_train_start(state)``: every rank, once the run is built and resumed, before the first
  step; ``state`` is the :class:`TrainState` (model, data, the step it starts from, rank, ...).
* ``on_eval(step, metrics)``: rank 0, after each validation (every ``eval_every`` steps and the
  last): the ``val/`` metrics alone.
* ``on_step_end(step, metrics)``: rank 0, at each reported step (every ``log_every`` steps,
  each validation step and the last): the metrics since the previous read, with the ``val/``
  ones on a validation step, so one call is one row of the run's record.
* ``on_checkpoint_saved(step, path)``: every rank, once a checkpoint is complete.
* ``on_train_end(result)``: every rank, with the :class:`TrainResult`: ``finished``, or
  ``failed`` (a non-finite loss ends a run with a result, not an exception). A hook may complete
  the result (the orchestrator's token-depth export sets ``result.token_depth``).
* ``on_error(exc)``: every rank, when an exception escapes a step or a hook after
  ``on_train_start``; ``train()`` raises it again once every callback has seen it.

The metric hooks run on rank 0 only: the one process that reports. The others run on every rank
because what they may do can need all of them (a forward of a sharded model is a collective).

Fencing: ``train(fence=...)`` is a callable that raises once this process may no longer write
(the orchestrator backs it with its lease on the run folder). It is called before the metric
hooks and before each checkpoint save, so a process that lost its folder writes nothing more.

Exact resume: a checkpoint holds the model, optimizer, scheduler, data position and RNG states,
and the data order is a pure function of (seed, epoch), so a run killed at any point and resumed
from its last checkpoint reproduces the uninterrupted run's losses step for step.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from alcot.common.typed import ConfigError

from . import checkpoints
from .config import ModelConfig, TrainerConfig, count_parameters
from .layouts import global_name, layer_offset, local_name

FIND = object()  # train(resume_from=FIND): look for the newest valid checkpoint


class NonFiniteLoss(RuntimeError):
    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


class StepStats:
    """The training metrics, kept on the device between two reads (no host stall per step).

    Per optimizer step the trainer adds each micro-batch's sums (loss, ce, adapt, depth x
    tokens, tokens) and FLOPs (nominal, realised, paper, kernel) as device tensors, and marks
    the first step whose loss or gradient norm is not finite; :meth:`read` brings everything to
    the host in one transfer, once per ``log_every`` (and before a checkpoint or an evaluation).
    """

    def __init__(self, device):
        self.device = device
        self.sums = torch.zeros(9, dtype=torch.float64, device=device)
        self.bad_step = torch.full((), -1, dtype=torch.float64, device=device)
        self.grad_norm = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, loss, ce, adapt, depth, tokens: int, flops) -> None:
        """One micro-batch (``flops``: a :class:`~alcot.model.flops.Flops` or a dict)."""
        raw = flops.raw if hasattr(flops, "raw") else flops.__getitem__
        parts = [
            loss.detach().double() * tokens,
            ce.detach().double() * tokens,
            adapt.detach().double() * tokens,
            depth.double().sum(),
        ]
        fl = [raw(k) for k in ("nominal", "realised", "paper", "kernel")]
        host = [float(tokens)] + [v for v in fl if not torch.is_tensor(v)]
        dev = torch.stack([*(t.to(self.device) for t in parts)])
        self.sums[:4] += dev
        if len(host) == 5:  # every FLOPs figure known on the host: one small copy
            self.sums[4:] += torch.tensor(host, dtype=torch.float64).to(self.device)
        else:
            self.sums[4] += float(tokens)
            for i, v in enumerate(fl):
                self.sums[5 + i] += v.to(self.device) if torch.is_tensor(v) else v

    def add_sums(self, stats: torch.Tensor) -> None:
        """The nine sums at once (pipeline parallelism's broadcast statistics)."""
        self.sums += stats.to(self.device)

    def check(self, step: int, value: torch.Tensor) -> None:
        """Mark ``step`` if ``value`` is not finite (on the device, nothing read)."""
        bad = ~torch.isfinite(value.detach()).all()
        self.bad_step = torch.where(bad & (self.bad_step < 0), float(step), self.bad_step)

    def read(self) -> tuple[list[float], float, int | None]:
        """(the nine sums, the last grad norm, the first non-finite step or None), then reset."""
        vals = torch.cat([self.sums, self.grad_norm[None], self.bad_step[None]]).tolist()
        self.sums.zero_()
        bad = int(vals[10])
        return vals[:9], vals[9], (bad if bad >= 0 else None)


@dataclass
class TrainResult:
    status: str  # "finished" | "failed"
    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    message: str = ""
    checkpoint: Path | None = None
    resumed_from: int | None = None
    depth_histogram: list[float] = field(default_factory=list)
    token_depth: Path | None = None  # CSV of (step-0 loss, executed depth) per sampled token


def warmup_count(tcfg: TrainerConfig) -> int:
    """Warm-up optimizer steps: ``warmup_steps`` when set (at most ``steps``), else
    ``warmup_frac`` x ``steps`` rounded (at least one), none when both are 0."""
    if tcfg.warmup_steps > 0:
        return min(tcfg.warmup_steps, tcfg.steps)
    return max(1, round(tcfg.warmup_frac * tcfg.steps)) if tcfg.warmup_frac > 0 else 0


def lr_lambda(tcfg: TrainerConfig):
    warmup = warmup_count(tcfg)

    def f(step: int) -> float:  # step = optimizer steps taken so far
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, tcfg.steps - warmup))
        return tcfg.min_lr_ratio + (1 - tcfg.min_lr_ratio) * 0.5 * (
            1 + math.cos(math.pi * progress)
        )

    return f


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global grad norm across tensor-parallel shards (replicated parameters counted once) and
    pipeline stages (each holds its own parameters)."""
    from .parallel import pp_group, pp_world_size, tp_group, tp_world_size

    sharded = [
        p.grad for p in params if p.grad is not None and getattr(p, "tensor_model_parallel", False)
    ]
    replicated = [
        p.grad
        for p in params
        if p.grad is not None and not getattr(p, "tensor_model_parallel", False)
    ]
    # on the parameters' device: the sums go through torch.distributed (NCCL: never the CPU)
    dev = (sharded or replicated)[0].device if (sharded or replicated) else params[0].device
    sq_sharded = sum((g.float().pow(2).sum() for g in sharded), torch.zeros((), device=dev))
    if tp_world_size() > 1:
        dist.all_reduce(sq_sharded, group=tp_group())
    sq = sq_sharded + sum((g.float().pow(2).sum() for g in replicated), torch.zeros((), device=dev))
    if dist.is_initialized() and pp_world_size() > 1:
        dist.all_reduce(sq, group=pp_group())
    norm = sq.sqrt()
    if max_norm > 0:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in sharded + replicated:
            g.mul_(coef.to(g.dtype))
    return norm


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def param_dtype(tcfg: TrainerConfig, device: torch.device) -> torch.dtype:
    """The model's parameter dtype under ``train.precision``."""
    bf16 = tcfg.precision == "bf16" or (tcfg.precision == "auto" and device.type == "cuda")
    return torch.bfloat16 if bf16 else torch.float32


@torch.no_grad()
def validate(model, data, tcfg: TrainerConfig, seq_len: int, batch: int, device) -> dict:
    """The validation loss, perplexity and executed-depth distribution over ``eval_batches``
    batches of the held-out split (the model's mode is restored after)."""
    was_training = model.training
    model.eval()
    l_max = model.cfg.l_max
    ce_sum, tokens = 0.0, 0
    hist = torch.zeros(l_max + 1, dtype=torch.float64)
    for x, y in data.eval_batches(seq_len, batch, tcfg.eval_batches):
        x, y = x.to(device), y.to(device)
        out = model(x, y)
        n = y.numel()
        ce_sum += out.ce_loss.item() * n
        tokens += n
        hist += torch.bincount(out.depth.flatten().cpu(), minlength=l_max + 1).double()
    model.train(was_training)
    ce = ce_sum / tokens
    frac = hist / hist.sum()
    metrics = {
        "val/loss": ce,
        "val/ppl": math.exp(min(ce, 50.0)),
        "val/mean_depth": float((torch.arange(l_max + 1) * frac).sum()),
    }
    metrics.update({f"val/depth_frac_{k}": f for k, f in enumerate(frac.tolist())})
    return metrics


def _load_checkpoint(info, model, opt, opt_names, main_names, device) -> dict:
    """This rank's payload of a checkpoint: its own file when the checkpoint was written at the
    current (tensor, pipeline) layout, else rebuilt from every rank's file (``layouts.py``)."""
    from .layouts import load_resharded, rank_file, saved_layout
    from .parallel import pp_rank, pp_world_size, tp_rank, tp_world_size

    tp, pp = tp_world_size(), pp_world_size()
    old_tp, old_pp, _ = saved_layout(info.path)
    if (old_tp, old_pp) == (tp, pp):
        path = info.path / rank_file(tp_rank(), pp_rank(), pp)
        return torch.load(path, map_location=device, weights_only=True)
    offset = layer_offset(model)
    params = {global_name(n, offset): p for n, p in model.named_parameters()}
    keys = [global_name(n, offset) for n in model.state_dict()]
    return load_resharded(
        info, params, keys, opt.state_dict(), opt_names, main_names, tp_rank(), tp, device
    )


def pipeline_step(model, loader, tcfg: TrainerConfig, device, step: int):
    """One optimizer step's forward and backward under pipeline parallelism: the step's
    ``grad_accum`` micro-batches go through the stages together (``model/pipeline.py``); the
    last stage's loss sums reach every stage (rank 0, a first stage, logs them)."""
    from megatron.core import parallel_state as ps

    from .pipeline import run_pipeline

    batches = []
    for _ in range(tcfg.grad_accum):
        x, y = loader.next_batch()
        batches.append((x.to(device), y.to(device), None))
    outs = run_pipeline(model, batches, True, 1.0 / tcfg.grad_accum)
    # the 5 sums, then the 4 FLOPs counters; on the device, which NCCL needs (it refuses CPU
    # tensors), and read only when the trainer logs
    acc = StepStats(device)
    if model.last:
        for (_, y, _), out in zip(batches, outs, strict=True):
            acc.add(out.loss, out.ce_loss, out.adapt_loss, out.depth, y.numel(), out.flops)
    stats = acc.sums
    dist.broadcast(
        stats,
        src=ps.get_pipeline_model_parallel_last_rank(),
        group=ps.get_pipeline_model_parallel_group(),
    )
    return stats


# ------------------------------------------------------------------------------ callbacks
class Callback:
    """A run's hooks; each does nothing here. When each is called: the module docstring."""

    def on_train_start(self, state: TrainState) -> None:
        """Every rank, before the first step (after the setup and any resume)."""

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        """Rank 0, after a validation: its ``val/`` metrics."""

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        """Rank 0, at a reported step: the step's row of metrics (``val/`` ones included)."""

    def on_checkpoint_saved(self, step: int, path: Path) -> None:
        """Every rank, after the checkpoint of ``step`` is complete at ``path``."""

    def on_train_end(self, result: TrainResult) -> None:
        """Every rank, with the run's result (finished or failed)."""

    def on_error(self, exc: BaseException) -> None:
        """Every rank, with an exception that escaped a step or a hook (raised again after)."""


# ------------------------------------------------------------------------------ the run
class _Window:
    """Wall time and optimizer steps since the metrics were last read (the throughput's
    window: validation and checkpoints fall outside it)."""

    def __init__(self):
        self.restart()

    def restart(self) -> None:
        self.t0, self.steps = time.perf_counter(), 0


@dataclass
class TrainState:
    """One run between steps: what :func:`build_state` builds, :func:`resume` restores and
    :func:`train_step` advances. Callbacks get it at ``on_train_start``."""

    model_cfg: ModelConfig
    tcfg: TrainerConfig
    data: Any  # an alcot.data.PreparedData
    seq_len: int
    out_dir: Path
    device: torch.device
    rank: int  # the global rank (rank 0 reports)
    dp_world: int  # data-parallel ranks
    micro: int  # sequences per micro-batch, over all data-parallel ranks
    model: Any  # the AlcotModel (this rank's shard)
    main: Any  # precision.MainParams: the fp32 main copies the optimizer steps
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    opt_names: list[str]  # the optimizer's parameter indices, by global name
    main_names: list[str]  # the parameters with a separate fp32 main copy, by global name
    offset: int  # this pipeline stage's first layer (local <-> global parameter names)
    loader: Any  # the data's train loader (its position is checkpointed)
    stats: StepStats  # the metrics since the last read, on the device
    counters: dict[str, float]  # cumulative tokens and FLOPs (checkpointed)
    ddp_model: Any = None  # the model, or its DDP wrapper (wrap_data_parallel)
    params: list[torch.nn.Parameter] = field(default_factory=list)  # clipped and stepped
    step: int = 0  # optimizer steps taken
    resumed_from: int | None = None
    last_checkpoint: Path | None = None
    depth_histogram: list[float] = field(default_factory=list)  # at the last validation
    window: _Window = field(default_factory=_Window)

    @property
    def pp(self) -> int:
        return self.model_cfg.pipeline_parallel_size

    @property
    def manual_dp(self) -> bool:
        """Gradients averaged over data-parallel ranks by hand, on the main copies: bf16 (the
        optimizer's parameters are not the model's) or pipeline stages (whose backward is
        several calls per micro-batch, which DDP's hooks do not follow)."""
        return self.main.reduced or self.pp > 1

    @property
    def ckpt_dir(self) -> Path:
        return Path(self.out_dir) / "checkpoints"


def build_state(
    model_cfg: ModelConfig, data, tcfg: TrainerConfig, seed: int, out_dir: Path, seq_len: int
) -> TrainState:
    """The run at step 0: process groups, seeds, the model in its precision, the optimizer
    (:func:`optimizer`), the warm-up + cosine schedule and the data's loader."""
    from megatron.core import parallel_state as ps

    from .network import AlcotModel
    from .parallel import init_parallel
    from .precision import MainParams, cast_model

    init_parallel(
        model_cfg.tensor_parallel_size, pipeline_parallel_size=model_cfg.pipeline_parallel_size
    )
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    device = _device()
    rank = dist.get_rank() if dist.is_initialized() else 0
    dp_world, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    micro = tcfg.batch_size // tcfg.grad_accum
    if micro % dp_world:
        raise ConfigError(
            "train.batch_size",
            f"micro-batch {micro} is not divisible by {dp_world} data-parallel ranks",
        )
    if seq_len > model_cfg.max_seq_len:
        raise ConfigError("data.seq_len", f"{seq_len} exceeds model.max_seq_len")
    torch.manual_seed(seed)
    random.seed(seed)
    model = cast_model(AlcotModel(model_cfg), param_dtype(tcfg, device)).to(device)
    main = MainParams(list(model.parameters()))  # fp32 main copies of bf16 parameters
    offset = layer_offset(model)
    opt, opt_names, main_names = optimizer(model, main, offset, model_cfg, tcfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tcfg))
    # the data's own loader (alcot.data: packed token files, or Megatron-Core's GPTDataset)
    loader = data.train_loader(
        seq_len, micro, seed, dp_rank, dp_world, samples=tcfg.steps * tcfg.batch_size
    )
    counters = {
        "tokens": 0,
        "flops_nominal": 0.0,
        "flops_realised": 0.0,
        "flops_paper": 0.0,
        "flops_kernel": 0.0,
    }
    return TrainState(
        model_cfg=model_cfg,
        tcfg=tcfg,
        data=data,
        seq_len=seq_len,
        out_dir=Path(out_dir),
        device=device,
        rank=rank,
        dp_world=dp_world,
        micro=micro,
        model=model,
        main=main,
        opt=opt,
        sched=sched,
        opt_names=opt_names,
        main_names=main_names,
        offset=offset,
        loader=loader,
        stats=StepStats(device),
        counters=counters,
    )


def optimizer(
    model, main, offset: int, model_cfg: ModelConfig, tcfg: TrainerConfig
) -> tuple[torch.optim.AdamW, list[str], list[str]]:
    """AdamW over the main parameters, and the global names of its parameter indices and of
    the parameters with a separate main copy (what a checkpoint needs to be resharded).

    Groups: matrices decay; norms, biases and embeddings do not; with ``halting.router_lr_scale``
    the router's parameters train at their own rate in groups of their own, after the others,
    on every pipeline stage (empty where no router lives: every stage has the same layout)."""
    gname = {n: global_name(n, offset) for n, _ in model.named_parameters()}
    decay, no_decay, decay_names, no_decay_names = [], [], [], []
    router_lr = tcfg.lr * (model_cfg.halting.router_lr_scale if model_cfg.uses_router else 1.0)
    routed: dict[bool, tuple[list, list]] = {True: ([], []), False: ([], [])}
    for n, p in model.named_parameters():
        is_decay = p.dim() >= 2 and "embedding" not in n
        if router_lr != tcfg.lr and n.startswith("router."):
            routed[is_decay][0].append(main.main_of(p))
            routed[is_decay][1].append(gname[n])
            continue
        (decay if is_decay else no_decay).append(main.main_of(p))
        (decay_names if is_decay else no_decay_names).append(gname[n])
    opt_names = decay_names + no_decay_names
    main_names = [gname[n] for n, p in model.named_parameters() if main.main_of(p) is not p]
    groups = [
        {"params": decay, "weight_decay": tcfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if router_lr != tcfg.lr:
        for is_decay, (params, names) in routed.items():
            wd = tcfg.weight_decay if is_decay else 0.0
            groups.append({"params": params, "weight_decay": wd, "lr": router_lr})
            opt_names += names
    opt = torch.optim.AdamW(groups, lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2))
    return opt, opt_names, main_names


def resume(state: TrainState, info: checkpoints.CheckpointInfo) -> None:
    """Continue ``state`` from the checkpoint ``info``, at any (tensor, pipeline) layout: the
    weights, main copies, optimizer, schedule, data position, counters and RNG states."""
    s = state
    payload = _load_checkpoint(info, s.model, s.opt, s.opt_names, s.main_names, s.device)
    s.model.load_state_dict({local_name(n, s.offset): t for n, t in payload["model"].items()})
    s.main.load_state_dict(payload.get("main_params"))
    s.opt.load_state_dict(payload["optimizer"])
    s.sched.load_state_dict(payload["scheduler"])
    s.loader.load_state_dict(payload["data"])
    s.counters.update(payload["counters"])
    _set_rng_state(payload["rng"])
    s.step = s.resumed_from = info.step
    s.last_checkpoint = info.path


def wrap_data_parallel(state: TrainState) -> None:
    """Wrap the model in DDP over the data-parallel ranks, unless their gradients are averaged
    by hand (:attr:`TrainState.manual_dp`); list the parameters the step clips and updates."""
    from megatron.core import parallel_state as ps

    s = state
    s.ddp_model = s.model
    if s.dp_world > 1 and not s.manual_dp:
        s.ddp_model = torch.nn.parallel.DistributedDataParallel(
            s.model,
            process_group=ps.get_data_parallel_group(),
            find_unused_parameters=s.model.router is not None or s.model.mor_router is not None,
        )
    s.params = [p for p in s.main.params() if p.requires_grad]


def save_checkpoint(state: TrainState, step: int, run_meta: dict | None) -> Path:
    """This rank's part of the checkpoint of ``step`` (``checkpoints.save``: atomic, checksummed,
    the oldest beyond ``keep_checkpoints`` pruned); returns its folder."""
    s = state
    payload = {
        # global names and named optimizer entries: any layout can resume it (layouts.py)
        "model": {global_name(n, s.offset): t for n, t in s.model.state_dict().items()},
        "layout": {"tp": s.model_cfg.tensor_parallel_size, "pp": s.pp},
        "optimizer": s.opt.state_dict(),
        "opt_names": s.opt_names,
        "main_params": s.main.state_dict() or None,
        "main_names": s.main_names,
        "scheduler": s.sched.state_dict(),
        "data": s.loader.state_dict(),
        "counters": dict(s.counters),
        "rng": _rng_state(),
    }
    return checkpoints.save(s.ckpt_dir, step, payload, run_meta or {}, s.tcfg.keep_checkpoints)


# ------------------------------------------------------------------------------ one step
def train_step(state: TrainState, step: int, probe=None) -> float:
    """Optimizer step ``step``: ``grad_accum`` micro-batches forward and backward (gradients
    accumulated on the main copies; DDP synchronises on the last one only), the data-parallel
    mean where DDP does not take it, clipping by the global gradient norm, then AdamW and the
    schedule. Returns the step's learning rate.

    The step's metrics (loss sums, depth, tokens, FLOPs, gradient norm, a non-finite mark) are
    added to ``state.stats`` on the device and not read here: a read per step would make the
    host wait for the device every step. :func:`read_metrics` reads them when they are due."""
    s, tcfg, stats = state, state.tcfg, state.stats
    s.model.halting_progress = (step - 1) / tcfg.steps  # the router's warm-ups
    s.opt.zero_grad(set_to_none=True)
    lr = s.sched.get_last_lr()[0]
    if s.pp > 1:
        sums = pipeline_step(s.model, s.loader, tcfg, s.device, step)
        stats.add_sums(sums)
        stats.check(step, sums[0])
        s.main.accumulate()
    for i in range(tcfg.grad_accum if s.pp == 1 else 0):
        x, y = s.loader.next_batch()
        x, y = x.to(s.device), y.to(s.device)
        if probe is not None and i == 0:
            probe(step, s.model, x, y)
        last = i == tcfg.grad_accum - 1
        sync = s.ddp_model.no_sync() if (s.dp_world > 1 and not last) else nullcontext()
        with sync:
            out = s.ddp_model(x, y)
            stats.check(step, out.loss)  # read with the metrics, not here
            (out.loss / tcfg.grad_accum).backward()
        s.main.accumulate()
        stats.add(out.loss, out.ce_loss, out.adapt_loss, out.depth, y.numel(), out.flops)
    if s.dp_world > 1 and s.manual_dp:
        from megatron.core import parallel_state as ps

        s.main.all_reduce_mean(ps.get_data_parallel_group(), s.dp_world)
    grad_norm = clip_grad_norm(s.params, tcfg.grad_clip)
    stats.check(step, grad_norm)
    stats.grad_norm = grad_norm.detach().double().to(s.device)
    s.opt.step()
    s.main.copy_to_model()
    s.sched.step()
    s.step = step
    return lr


def read_metrics(state: TrainState, lr: float) -> dict[str, float]:
    """The metrics since the last read, in one host read of the device-side sums (summed over
    data-parallel ranks first: every rank reads at the same steps, the sum is a collective).
    Raises :class:`NonFiniteLoss` if a step's loss or gradient norm was not finite."""
    s, stats, counters = state, state.stats, state.counters
    if s.dp_world > 1:
        from megatron.core import parallel_state as ps

        dist.all_reduce(stats.sums, group=ps.get_data_parallel_group())
        bad = stats.bad_step.clone()
        dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=ps.get_data_parallel_group())
        stats.bad_step = bad
    sums, grad_norm, bad = stats.read()
    if bad is not None:
        raise NonFiniteLoss(f"non-finite loss or gradient norm at step {bad}", bad)
    tok = sums[4]
    counters["tokens"] += int(tok)
    counters["flops_nominal"] += sums[5]
    counters["flops_realised"] += sums[6]
    counters["flops_paper"] += sums[7]
    counters["flops_kernel"] += sums[8]
    # the steps since the last read, evaluation and checkpoints excluded
    dt = time.perf_counter() - s.window.t0
    n_steps = max(s.window.steps, 1)
    tok_div = max(tok, 1.0)
    return {
        # averaged over the steps since the last read (each step's own when log_every = 1)
        "train/loss": sums[0] / tok_div,
        "train/ce": sums[1] / tok_div,
        "train/adapt": sums[2] / tok_div,
        "train/mean_depth": sums[3] / tok_div,
        "train/grad_norm": grad_norm,
        "lr": lr,
        "tokens_seen": float(counters["tokens"]),
        "flops/nominal": counters["flops_nominal"],
        "flops/realised": counters["flops_realised"],
        "flops/paper": counters["flops_paper"],
        # the work the attention kernel executed, masked pairs included (flops.py)
        "flops/kernel": counters["flops_kernel"],
        "throughput/tokens_per_s": tok / dt if dt > 0 else 0.0,
        "time/step_s": dt / n_steps,
    }


class _Progress:
    """The progress bar on rank 0 (nothing elsewhere, or with ``progress=False``)."""

    def __init__(self, enabled: bool, total: int, initial: int):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, metrics: dict[str, float] | None = None) -> None:
        if self.bar is None:
            return
        if metrics is not None:
            self.bar.set_postfix(
                loss=f"{metrics['train/loss']:.3f}",
                tok_s=f"{metrics['throughput/tokens_per_s']:.0f}",
                depth=f"{metrics['train/mean_depth']:.2f}",
            )
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------ the loop
def train(
    model_cfg: ModelConfig,
    data,
    tcfg: TrainerConfig,
    seed: int,
    out_dir: Path,
    seq_len: int,
    callbacks: Sequence[Callback] = (),
    run_meta: dict | None = None,
    progress: bool = True,
    log=print,
    resume_from: checkpoints.CheckpointInfo | None | object = FIND,
    probe=None,
    fence=None,
) -> TrainResult:
    """Train (or resume) one run. ``data`` is an :class:`alcot.data.PreparedData`.

    With ``train.resume: auto`` the run continues from ``resume_from``, by default the newest
    valid checkpoint in ``out_dir`` (a caller that already looked passes what it found, or
    None, so that checkpoints are not read and checksummed twice).

    ``callbacks``: :class:`Callback` objects, called in order at each phase (module docstring).
    ``fence``: a callable "may I still write?" that raises to stop the run; called before the
    metric hooks and each checkpoint save (the orchestrator backs it with its lease on the run
    folder, so that a process that lost the folder writes nothing more).

    ``probe(step, model, input_ids, labels)``, if given, sees each step's first micro-batch
    before the step's forward, with the weights the step starts from (one pipeline stage only:
    ``alcot diagnose --train`` measures the training dynamics with it)."""
    # 1. the run at step 0: process groups, seeds, model, optimizer groups, schedule, data
    state = build_state(model_cfg, data, tcfg, seed, out_dir, seq_len)
    # 2. continue from the newest valid checkpoint (train.resume: auto)
    if tcfg.resume == "auto":
        info = checkpoints.latest_valid(state.ckpt_dir) if resume_from is FIND else resume_from
        if info is not None:
            resume(state, info)
            if state.rank == 0:
                log(f"resumed from {info.path} (step {info.step})")
    # 3. data parallelism: DDP, or gradients averaged by hand (bf16, pipeline stages)
    wrap_data_parallel(state)
    bar = _Progress(progress and state.rank == 0, tcfg.steps, state.step)
    metrics: dict[str, float] = {}  # the last metrics read
    try:
        for cb in callbacks:
            cb.on_train_start(state)
        state.window.restart()
        for step in range(state.step + 1, tcfg.steps + 1):
            # 4. one optimizer step; its metrics stay on the device
            lr = train_step(state, step, probe)
            state.window.steps += 1
            last = step == tcfg.steps
            log_due = step % tcfg.log_every == 0 or last
            eval_due = step % tcfg.eval_every == 0 or last
            save_due = step % tcfg.checkpoint_every == 0 or last
            if not (log_due or eval_due or save_due):
                bar.update()
                continue
            # 5. read the metrics since the last read (every rank, at the same steps)
            try:
                metrics = read_metrics(state, lr)
            except NonFiniteLoss as err:  # the run stops with a failed result
                result = _failed(state, err, metrics)
                break
            # 6. validate
            if eval_due:
                val = validate(state.model, data, tcfg, seq_len, state.micro, state.device)
                metrics.update(val)
                state.depth_histogram = [
                    val[f"val/depth_frac_{k}"] for k in range(model_cfg.l_max + 1)
                ]
            # 7. report (rank 0, fenced): the validation, then the step's row
            if state.rank == 0 and (log_due or eval_due):
                if fence is not None:
                    fence()
                for cb in callbacks if eval_due else ():
                    cb.on_eval(step, val)
                for cb in callbacks:
                    cb.on_step_end(step, metrics)
            bar.update(metrics)
            # 8. save a checkpoint (fenced)
            if save_due:
                if fence is not None:
                    fence()
                state.last_checkpoint = save_checkpoint(state, step, run_meta)
                for cb in callbacks:
                    cb.on_checkpoint_saved(step, state.last_checkpoint)
            state.window.restart()
        else:
            result = _finished(state, metrics)
        # 9. the end: the callbacks see (and may complete) the result
        for cb in callbacks:
            cb.on_train_end(result)
    except BaseException as exc:
        for cb in callbacks:
            cb.on_error(exc)
        raise
    finally:
        bar.close()
    return result


def _finished(state: TrainState, metrics: dict[str, float]) -> TrainResult:
    state.model.halting_progress = None
    counts = count_parameters(state.model_cfg)
    metrics = dict(metrics)
    metrics["params/non_embedding"] = float(counts["non_embedding"])
    return TrainResult(
        "finished",
        state.step,
        metrics,
        "",
        state.last_checkpoint,
        state.resumed_from,
        state.depth_histogram,
    )


def _failed(state: TrainState, err: NonFiniteLoss, metrics: dict[str, float]) -> TrainResult:
    step = err.step if err.step is not None else state.step
    last = state.last_checkpoint
    msg = f"{err}; the run is stopped. Last good checkpoint: {last or 'none'}"
    return TrainResult(
        "failed", step, metrics, msg, last, state.resumed_from, state.depth_histogram
    )
