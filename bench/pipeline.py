"""Pipeline parallelism on CPU over gloo: P = 1 against P = 2, adaptive latent CoT, l_max = 3.

For each micro-batch count M, one training step's forward and backward over M micro-batches
(no optimizer: the step's schedule is what is measured), median over the timed steps after a
warm-up. The P = 2 stages record when each of them computes (``pipeline.Timeline``); the idle
share of stage time is measured from those timestamps over the step's span (first start to
last end across stages; sends and waits count as idle).

Prints one JSON line per M (these keys), then the figure of record for the largest M with the
first five keys only:
  p1_s, p2_s        seconds per step, one process vs two pipeline stages
  microbatches      M
  bubble_measured   idle share of stage time, from the timestamps (median over timed steps)
  bubble_model      the schedule's bubble for equal slot costs: (P - 1) / (S M + P - 1) with
                    S = 1 + l_max traversals per micro-batch (``pipeline.bubble_fraction``)
  bubble_tokens     the same schedule simulated with each slot costing its executed tokens
                    (halting makes later steps cheaper; ``pipeline.simulate_bubble``)
  bubble_replayed   the schedule replayed with each slot's measured compute time and free
                    communication (``replayed_bubble``): measured - replayed is communication
                    and Python between slots, replayed - model is unequal slot costs
  mean_depth        executed latent steps per token
Target: bubble_measured <= bubble_model + 0.05. CPU timings with gloo are not GPU timings.

``--figure PATH`` also runs P = 2, l_max = 2, M = 4 and draws that step's measured timeline.
The router gets a spread of weights and tau = 0.4 so that tokens halt at different depths (an
untrained router keeps nearly every token), as in ``bench/model_speed.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")


def _config(pp: int, l_max: int):
    from alcot.model import ModelConfig

    return ModelConfig.from_dict(
        dict(
            size="tiny",
            method="adaptive",
            l_max=l_max,
            num_layers=8,
            hidden_size=256,
            num_attention_heads=4,
            vocab_size=512,
            pipeline_parallel_size=pp,
            halting={"tau": 0.4},
        )
    )


def _batches(m: int, b: int, s: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(0, 512, (b, s), generator=g), torch.randint(0, 512, (b, s), generator=g))
        for _ in range(m)
    ]


def worker(args) -> None:
    """One process: P = 1 (alone) or one of the P = 2 stages."""
    from alcot.model import AlcotModel, init_parallel
    from alcot.model.layouts import full_state_dict, load_full_state_dict
    from alcot.model.pipeline import Timeline, run_pipeline

    torch.set_num_threads(1)
    pp = int(os.environ.get("WORLD_SIZE", 1))
    init_parallel(1, pipeline_parallel_size=pp)
    rank = torch.distributed.get_rank()
    weights = Path(args.work) / f"weights_l{args.l_max}.pt"
    torch.manual_seed(0)
    model = AlcotModel(_config(pp, args.l_max))
    if pp == 1:
        with torch.no_grad():
            gen = torch.Generator().manual_seed(1)
            for p in model.router.parameters():
                if p.dim() == 2:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        torch.save(full_state_dict(model), weights)
    else:
        load_full_state_dict(model, torch.load(weights, weights_only=True))
    results = []
    for m in args.micro:
        batches = _batches(m, args.batch, args.seq, seed=m)
        times, timelines, depth = [], [], 0.0
        for rep in range(args.warmup + args.steps):
            model.zero_grad(set_to_none=True)
            tl = Timeline()
            t0 = time.perf_counter()
            if pp == 1:
                outs = []
                for x, y in batches:
                    out = model(x, y)
                    (out.loss / m).backward()
                    outs.append(out)
            else:
                outs = run_pipeline(
                    model, [(x, y, None) for x, y in batches], True, 1 / m, False, tl
                )
                torch.distributed.barrier()
            dt = time.perf_counter() - t0
            if rep >= args.warmup:
                times.append(dt)
                timelines.append(tl.events)
                if outs is not None:
                    depth = statistics.mean(o.mean_depth for o in outs)
                    tokens = [[float(t.sum()) for t in _ran(o)] for o in outs]
        if pp > 1:
            parts = [None] * pp
            torch.distributed.all_gather_object(parts, (timelines, depth, tokens if rank else None))
            timelines = [[p[0][j] for p in parts] for j in range(len(times))]
            depth = parts[-1][1]
            tokens = parts[-1][2]
        results.append(dict(m=m, times=times, timelines=timelines, depth=depth, tokens=tokens))
    if rank == 0:
        tag = f"p{pp}_l{args.l_max}"
        torch.save(results, Path(args.work) / f"{tag}.pt")
    if pp > 1:
        torch.distributed.barrier()


def _ran(out):
    """Executed tokens per latent step of one micro-batch (from the executed depths)."""
    d = out.depth
    return [(d >= k) for k in range(int(d.max()) + 1)]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(work: str, world: int, extra: list[str]) -> None:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_port()))
    env.update(WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    cmd = [sys.executable, __file__, "--worker", "--work", work, *extra]
    procs = [
        subprocess.Popen(cmd, env=dict(env, RANK=str(r), LOCAL_RANK=str(r))) for r in range(world)
    ]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"a worker failed: exit codes {codes}")


def measured_bubble(stages: list[list[tuple]]) -> float:
    """1 - (sum of compute time over stages) / (stages x span of the step)."""
    start = min(e[3] for ev in stages for e in ev)
    end = max(e[4] for ev in stages for e in ev)
    busy = sum(e[4] - e[3] for ev in stages for e in ev)
    return 1.0 - busy / (len(stages) * (end - start))


def replayed_bubble(stages: list[list[tuple]]) -> float:
    """The bubble of the schedule replayed with each slot's measured compute time and free
    communication: every stage runs its slots in the recorded order, each slot as soon as its
    stage is free and its input is there (forward: the previous stage's slot, or for step k > 0
    on the first stage the last stage's step k - 1 with its program; the loss backward: the
    micro-batch's last forward; backward: the next stage's slot, or on the last stage the first
    stage's step k + 1). measured - replayed is the cost of communication and of the Python
    between slots; replayed - bubble_model is what unequal slot costs add to the schedule."""
    n = len(stages)
    dur: list[dict] = [{} for _ in range(n)]
    order: list[list] = [[] for _ in range(n)]
    for p, ev in enumerate(stages):
        for kind, i, k, a, b in ev:
            key = ("F" if kind in "FP" else kind, i, k)  # a program runs right after its slot
            if key not in dur[p]:
                order[p].append(key)
            dur[p][key] = dur[p].get(key, 0.0) + (b - a)
    last_f = {i: k for kind, i, k in order[-1] if kind == "F"}
    end: dict = {}
    free = [0.0] * n
    pos = [0] * n
    left = sum(len(o) for o in order)
    while left:
        moved = False
        for p in range(n):
            if pos[p] == len(order[p]):
                continue
            kind, i, k = order[p][pos[p]]
            if kind == "F":
                dep = (p - 1, "F", i, k) if p else ((n - 1, "F", i, k - 1) if k else None)
            elif kind == "L":
                dep = (p, "F", i, last_f[i])
            elif p < n - 1:
                dep = (p + 1, "B", i, k)
            else:
                dep = (0, "B", i, k + 1) if ("B", i, k + 1) in dur[0] else None
            if dep is not None and dep not in end:
                continue
            start = max(free[p], end[dep] if dep else 0.0)
            end[(p, kind, i, k)] = free[p] = start + dur[p][(kind, i, k)]
            pos[p] += 1
            left -= 1
            moved = True
        if not moved:
            raise RuntimeError("the recorded slot order cannot be replayed (a cycle)")
    busy = sum(sum(d.values()) for d in dur)
    return 1.0 - busy / (n * max(free))


def figure(path: Path, stages: list[list[tuple]], l_max: int, m: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = min(e[3] for ev in stages for e in ev)
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(13, 2.6))
    for p, ev in enumerate(stages):
        for kind, i, k, a, b in ev:
            a, b = (a - t0) * 1e3, (b - t0) * 1e3
            face = colours(i) if kind in "FB" else ("0.6" if kind == "L" else "0.85")
            ax.barh(
                p, b - a, left=a, color=face, edgecolor="black", linewidth=0.4,
                alpha=1.0 if kind == "F" else 0.55, hatch=None if kind == "F" else "//",
            )  # fmt: skip
            label = {"L": "loss", "P": "p"}.get(kind, f"{kind}{i},{k}")
            if b - a > 1.2:
                ax.text((a + b) / 2, p, label, ha="center", va="center", fontsize=6)
    ax.set_yticks(range(len(stages)), [f"stage {p}" for p in range(len(stages))])
    ax.invert_yaxis()
    ax.set_xlabel("ms since the step began (measured)")
    ax.set_title(
        f"One training step, P = {len(stages)}, l_max = {l_max}, M = {m} micro-batches: "
        "F i,k = forward of micro-batch i, latent step k (colour = micro-batch); "
        "hatched B = backward; light grey p = last stage's program; grey = loss backward",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=150)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--micro", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--l-max", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--figure", type=Path, default=None)
    ap.add_argument("--dump", type=Path, default=None, help="save the P = 2 timelines here")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    from alcot.model.pipeline import bubble_fraction, simulate_bubble

    with tempfile.TemporaryDirectory(prefix="alcot-pp-bench-") as work:
        common = ["--micro", *map(str, args.micro), "--batch", str(args.batch)]
        common += ["--seq", str(args.seq), "--warmup", str(args.warmup), "--steps", str(args.steps)]
        for world in (1, 2):
            launch(work, world, [*common, "--l-max", str(args.l_max)])
        p1 = torch.load(Path(work) / f"p1_l{args.l_max}.pt", weights_only=False)
        p2 = torch.load(Path(work) / f"p2_l{args.l_max}.pt", weights_only=False)
        if args.dump is not None:
            torch.save(p2, args.dump)
        rows = []
        for a, b in zip(p1, p2, strict=True):
            m = a["m"]
            bubbles = [measured_bubble(tl) for tl in b["timelines"]]
            replays = [replayed_bubble(tl) for tl in b["timelines"]]
            row = {
                "p1_s": round(statistics.median(a["times"]), 4),
                "p2_s": round(statistics.median(b["times"]), 4),
                "microbatches": m,
                "bubble_measured": round(statistics.median(bubbles), 4),
                "bubble_model": round(bubble_fraction(2, m, args.l_max + 1), 4),
                "bubble_tokens": round(simulate_bubble(2, b["tokens"]), 4),
                "bubble_replayed": round(statistics.median(replays), 4),
                "mean_depth": round(b["depth"], 3),
                "l_max": args.l_max,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        if args.figure is not None:
            fig_args = ["--micro", "4", "--batch", str(args.batch), "--seq", str(args.seq)]
            fig_args += ["--warmup", "1", "--steps", "1", "--l-max", "2"]
            launch(work, 1, fig_args)
            launch(work, 2, fig_args)
            run = torch.load(Path(work) / "p2_l2.pt", weights_only=False)[0]
            figure(args.figure, run["timelines"][0], 2, 4)
            print(f"timeline figure: {args.figure}")
    best = rows[-1]
    ok = best["bubble_measured"] <= best["bubble_model"] + 0.05
    print(f"target bubble_measured <= bubble_model + 0.05 at M = {best['microbatches']}: {ok}")
    keys = ("p1_s", "p2_s", "microbatches", "bubble_measured", "bubble_model")
    print(json.dumps({k: best[k] for k in keys}))  # the figure of record: the keys


if __name__ == "__main__":
    main()
