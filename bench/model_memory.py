"""Activation memory of vanilla, fixed-depth and adaptive latent CoT at one size, side by side.

Counts the bytes autograd saves for backward during one training forward
(``alcot.model.memory.saved_bytes``: every saved tensor's storage once, at its full size,
parameters excluded). Deterministic on CPU.

Prints one JSON line:
  vanilla_bytes, fixed_bytes, adaptive_bytes   saved for backward, one forward
  executed_fraction   executed token-steps / (tokens x (1 + l_max)) of the adaptive model
  memory_ratio        adaptive_bytes / fixed_bytes
and before it, as text: fixed / ((1 + l_max) vanilla), and fixed's bytes under
model.recompute = full (one layer per checkpoint).
Targets: memory_ratio <= executed_fraction + 0.10; fixed_bytes <= 1.15 x (1 + l_max) x vanilla.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore")


def main() -> None:
    from model_speed import add_model_args, make

    from alcot.model.memory import saved_bytes

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p)
    args = p.parse_args()

    from alcot.model import init_parallel

    init_parallel(1)
    vanilla = make("vanilla", args)
    vocab = vanilla.cfg.vocab_size
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(args.device)
    y = torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(args.device)
    got = {
        "vanilla": saved_bytes(vanilla, x, y),
        "fixed": saved_bytes(make("fixed", args), x, y),
    }
    adaptive = make("adaptive", args, tau=args.tau, **{"lambda": 0.01})
    got["adaptive"] = saved_bytes(adaptive, x, y)
    with torch.no_grad():
        depth = adaptive(x, y).depth
    executed = float((1 + depth.float()).mean()) / (1 + args.l_max)
    recompute = saved_bytes(make("fixed", args, recompute="full"), x, y)
    ratio = got["adaptive"] / got["fixed"]
    per_pass = got["fixed"] / ((1 + args.l_max) * got["vanilla"])
    for name, v in got.items():
        print(f"{name:10s} {v / 2**20:10.1f} MiB saved for backward")
    print(f"fixed, full recompute: {recompute / 2**20:.1f} MiB ({recompute} bytes)")
    print(
        f"memory_ratio {ratio:.3f} vs executed_fraction {executed:.3f} "
        f"(target <= {executed + 0.10:.3f}); fixed / ((1 + l_max) vanilla) = {per_pass:.3f} "
        "(target <= 1.15)"
    )
    print(
        json.dumps(
            {
                "vanilla_bytes": got["vanilla"],
                "fixed_bytes": got["fixed"],
                "adaptive_bytes": got["adaptive"],
                "executed_fraction": round(executed, 4),
                "memory_ratio": round(ratio, 4),
            }
        )
    )


if __name__ == "__main__":
    main()
