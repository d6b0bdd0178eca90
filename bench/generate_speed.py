"""Cached decoding speed of vanilla, fixed-depth and adaptive latent CoT, side by side.

Greedy decoding of ``--new`` tokens after a ``--prompt``-token prompt with the preallocated
latent caches (model/generate.py), at batch 1 and batch ``--batch``. Prints a table, then one
JSON line:
  vanilla_tps, fixed_tps, adaptive_tps   new tokens per second at batch 1
  mean_depth       executed latent steps per generated token of the adaptive model (batch 1)
  speedup          adaptive_tps / fixed_tps
  ideal            (1 + l_max) / (1 + mean_depth): the speedup if only executed steps cost
  host_reads_per_token   {method: host reads of tensor values (GPU stalls) per new token},
                   counted (alcot.model.hostreads) over a generation without a stop check
and, on the line before it ("also:"):
  flat             at batch 1, the adaptive model's mean decode time of the last 64 tokens /
                   that of the first 64 (attention grows with the text; nothing else should)
  *_b8             the same at batch --batch (tokens per second over all rows), and
  ideal_passes_b8  (1 + l_max) / (1 + mean over positions of the deepest row's depth): a
                   batch runs step k for the rows that need it, so while per-pass cost does not
                   shrink with the rows in it (small models, CPU, GPU decoding), the passes are
                   what it can save
Targets: speedup >= 0.9 x ideal; flat <= 1.2; speedup_b8 >= 0.9 x ideal_passes_b8;
host_reads_per_token <= 1.
``--decode static`` (default) decodes with fixed shapes and no host reads per token (every row
runs every latent step, halted rows as padding); ``skip`` skips the steps no row runs (one read
per step); ``--cuda-graph`` replays a captured decoding step (CUDA only).

As in bench/model_speed.py, the untrained router gets a spread of weights and tau = 0.6, so that
tokens halt at different depths as a trained router's do.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore")


def decode_times(model, prompt, new: int, **opts) -> tuple[list[float], object]:
    """Per-token wall-clock of cached decoding (``stop`` is called after every token; on a GPU
    it synchronises, so that each token's time is its own)."""
    from alcot.model.generate import generate

    stamps = []
    cuda = prompt.is_cuda

    def stop(tokens):
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        return False

    t0 = time.perf_counter()
    gen = generate(model, prompt, new, stop=stop, **opts)
    times = [b - a for a, b in zip([t0, *stamps[:-1]], stamps, strict=True)]
    return times, gen


def host_reads_per_token(model, prompt, new: int, **opts) -> float:
    """Host reads per new token: (reads of ``new`` tokens - reads of 1) / (new - 1), so the
    prefill and setup cancel out."""
    from alcot.model.generate import generate
    from alcot.model.hostreads import count_host_reads

    counts = []
    for n in (1, new):
        with count_host_reads() as reads:
            generate(model, prompt, n, **opts)
        counts.append(reads.total)
    return (counts[1] - counts[0]) / (new - 1)


def main() -> None:
    from model_speed import add_model_args, compared_models, pin_allocator

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds; medians of all")
    p.add_argument("--decode", choices=("static", "skip"), default="static")
    p.add_argument("--cuda-graph", action="store_true", help="replay a captured decode step")
    p.set_defaults(batch=8)
    args = p.parse_args()
    pin_allocator()

    from alcot.model import init_parallel

    init_parallel(1)
    models = compared_models(args)
    for m in models.values():
        m.eval()
    vocab = models["vanilla"].cfg.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = {
        b: torch.randint(0, vocab, (b, args.prompt), generator=g).to(args.device)
        for b in (1, args.batch)
    }
    opts = {"static": args.decode == "static", "cuda_graph": args.cuda_graph}
    reads = {n: host_reads_per_token(m, prompts[1], 16, **opts) for n, m in models.items()}
    tps: dict[tuple[str, int], list[float]] = {}
    per_token_b1: list[list[float]] = []
    depth, deepest = {}, {}
    for _ in range(args.rounds):  # interleaved, so machine noise hits every variant alike
        for b, prompt in prompts.items():
            for name, model in models.items():
                times, gen = decode_times(model, prompt, args.new, **opts)
                tps.setdefault((name, b), []).append(b * args.new / sum(times))
                if name == "adaptive":
                    new = gen.depth[:, args.prompt :]
                    depth[b] = new.float().mean().item()
                    deepest[b] = new.max(0).values.float().mean().item()
                    if b == 1:
                        per_token_b1.append(times)
    med = {k: statistics.median(v) for k, v in tps.items()}
    B = args.batch
    ideal = (1 + args.l_max) / (1 + depth[1])
    speedup = med[("adaptive", 1)] / med[("fixed", 1)]
    ideal_b = (1 + args.l_max) / (1 + depth[B])
    ideal_passes = (1 + args.l_max) / (1 + deepest[B])
    speedup_b = med[("adaptive", B)] / med[("fixed", B)]
    # per-token times at batch 1: medians over rounds, then first vs last 64
    per_tok = [statistics.median(ts) for ts in zip(*per_token_b1, strict=True)]
    w = min(64, len(per_tok) // 2)
    flat = statistics.mean(per_tok[-w:]) / statistics.mean(per_tok[:w])

    print(f"{'model':10s} {'tok/s b=1':>10s} {f'tok/s b={args.batch}':>11s}")
    for name in models:
        print(f"{name:10s} {med[(name, 1)]:10.1f} {med[(name, args.batch)]:11.1f}")
    print(
        f"batch 1: adaptive mean depth {depth[1]:.2f}; speedup {speedup:.3f} vs ideal "
        f"{ideal:.3f} (target >= {0.9 * ideal:.3f}); flat {flat:.3f} (target <= 1.2)"
    )
    print(
        f"batch {B}: mean depth {depth[B]:.2f}, deepest row per position {deepest[B]:.2f}; "
        f"speedup {speedup_b:.3f} vs ideal {ideal_b:.3f}, ideal by passes {ideal_passes:.3f}"
    )
    extra = {
        "flat": round(flat, 4),
        "vanilla_tps_b8": round(med[("vanilla", B)], 2),
        "fixed_tps_b8": round(med[("fixed", B)], 2),
        "adaptive_tps_b8": round(med[("adaptive", B)], 2),
        "mean_depth_b8": round(depth[B], 4),
        "speedup_b8": round(speedup_b, 4),
        "ideal_b8": round(ideal_b, 4),
        "ideal_passes_b8": round(ideal_passes, 4),
    }
    print("also: " + ", ".join(f"{k} {v}" for k, v in extra.items()))
    print(
        json.dumps(
            {
                "vanilla_tps": round(med[("vanilla", 1)], 2),
                "fixed_tps": round(med[("fixed", 1)], 2),
                "adaptive_tps": round(med[("adaptive", 1)], 2),
                "mean_depth": round(depth[1], 4),
                "speedup": round(speedup, 4),
                "ideal": round(ideal, 4),
                "host_reads_per_token": {k: round(v, 3) for k, v in reads.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
