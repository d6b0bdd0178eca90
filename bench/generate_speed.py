"""Cached decoding speed of vanilla, fixed-depth and adaptive latent CoT, side by side.

Greedy decoding of ``--new`` tokens after a ``--prompt``-token prompt with the preallocated
latent caches (model/generate.py), at batch 1 and batch ``--batch``. Prints a table, then one
JSON line:
  vanilla_tps, fixed_tps, adaptive_tps   new tokens per second (all rows) at batch --batch
  mean_depth       executed latent steps per generated token of the adaptive model
  speedup          adaptive_tps / fixed_tps
  ideal            (1 + l_max) / (1 + mean_depth): the speedup if only executed steps cost
  flat             at batch 1, the adaptive model's mean decode time of the last 64 tokens /
                   that of the first 64 (attention grows with the text; nothing else should)
  *_tps_b1         the same at batch 1
Targets: speedup >= 0.9 x ideal; flat <= 1.2.

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


def decode_times(model, prompt, new: int) -> tuple[list[float], object]:
    """Per-token wall-clock of cached decoding (``stop`` is called after every token)."""
    from alcot.model.generate import generate

    stamps = []

    def stop(tokens):
        stamps.append(time.perf_counter())
        return False

    t0 = time.perf_counter()
    gen = generate(model, prompt, new, stop=stop)
    times = [b - a for a, b in zip([t0, *stamps[:-1]], stamps, strict=True)]
    return times, gen


def main() -> None:
    from model_speed import add_model_args, make

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds; medians of all")
    p.set_defaults(batch=8)
    args = p.parse_args()

    from alcot.model import init_parallel

    init_parallel(1)
    models = {
        "vanilla": make("vanilla", args),
        "fixed": make("fixed", args),
        "adaptive": make("adaptive", args, tau=args.tau, **{"lambda": 0.01}),
    }
    for m in models.values():
        m.eval()
    vocab = models["vanilla"].cfg.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = {
        b: torch.randint(0, vocab, (b, args.prompt), generator=g).to(args.device)
        for b in (1, args.batch)
    }
    tps: dict[tuple[str, int], list[float]] = {}
    per_token_b1: list[list[float]] = []
    depth = {}
    for _ in range(args.rounds):  # interleaved, so machine noise hits every variant alike
        for b, prompt in prompts.items():
            for name, model in models.items():
                times, gen = decode_times(model, prompt, args.new)
                tps.setdefault((name, b), []).append(b * args.new / sum(times))
                if name == "adaptive":
                    depth[b] = gen.depth[:, args.prompt :].float().mean().item()
                    if b == 1:
                        per_token_b1.append(times)
    med = {k: statistics.median(v) for k, v in tps.items()}
    mean_depth = depth[args.batch]
    ideal = (1 + args.l_max) / (1 + mean_depth)
    speedup = med[("adaptive", args.batch)] / med[("fixed", args.batch)]
    # per-token times at batch 1: medians over rounds, then first vs last 64
    per_tok = [statistics.median(ts) for ts in zip(*per_token_b1, strict=True)]
    w = min(64, len(per_tok) // 2)
    flat = statistics.mean(per_tok[-w:]) / statistics.mean(per_tok[:w])

    print(f"{'model':10s} {'tok/s b=1':>10s} {f'tok/s b={args.batch}':>11s}")
    for name in models:
        print(f"{name:10s} {med[(name, 1)]:10.1f} {med[(name, args.batch)]:11.1f}")
    print(
        f"adaptive mean depth {mean_depth:.2f} (batch 1: {depth[1]:.2f}); speedup {speedup:.3f}"
        f" vs ideal {ideal:.3f} (target >= {0.9 * ideal:.3f}); flat {flat:.3f} (target <= 1.2)"
    )
    print(
        json.dumps(
            {
                "vanilla_tps": round(med[("vanilla", args.batch)], 2),
                "fixed_tps": round(med[("fixed", args.batch)], 2),
                "adaptive_tps": round(med[("adaptive", args.batch)], 2),
                "mean_depth": round(mean_depth, 4),
                "speedup": round(speedup, 4),
                "ideal": round(ideal, 4),
                "flat": round(flat, 4),
                "vanilla_tps_b1": round(med[("vanilla", 1)], 2),
                "fixed_tps_b1": round(med[("fixed", 1)], 2),
                "adaptive_tps_b1": round(med[("adaptive", 1)], 2),
                "batch": args.batch,
                "new_tokens": args.new,
                "l_max": args.l_max,
            }
        )
    )


if __name__ == "__main__":
    main()
