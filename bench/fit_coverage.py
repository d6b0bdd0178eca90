"""How often the bootstrap intervals of the L(C) fit cover the truth, and what a fit costs.

Draws ``--studies`` synthetic studies with known E, A, alpha: ``--runs`` runs of ``--points``
evaluations each, spread over two decades of compute, every run with its own offset (runs
differ, so points of one run are correlated) and per-point noise. Fits each with
``fit_power_law`` and a ``--boot``-replicate bootstrap over runs, and counts how often the
``--level`` interval of each parameter holds the true value. Prints, last, one JSON line:
studies, level, covered_E / covered_A / covered_alpha (fractions), median_alpha_width, and
seconds_per_fit (one fit with its bootstrap). Coverage near the level means the intervals can be
trusted; far below it, they are too narrow.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np

from alcot.analysis.fits import fit_power_law

TRUE = {"E": 2.0, "A": 3.0e3, "alpha": 0.3}


def study(rng, runs: int, points: int, offset: float, noise: float):
    c, loss, group = [], [], []
    for r in range(runs):
        shift = rng.normal(0, offset)
        for x in np.geomspace(1e10, 1e12, points) * rng.uniform(0.5, 2.0):
            law = TRUE["E"] + TRUE["A"] * x ** -TRUE["alpha"]
            c.append(x)
            loss.append(law * math.exp(shift + rng.normal(0, noise)))
            group.append(r)
    return c, loss, group


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--studies", type=int, default=40)
    p.add_argument("--runs", type=int, default=8)
    p.add_argument("--points", type=int, default=5)
    p.add_argument("--offset", type=float, default=0.01, help="per-run log-offset sd")
    p.add_argument("--noise", type=float, default=0.005, help="per-point log-noise sd")
    p.add_argument("--boot", type=int, default=100)
    p.add_argument("--level", type=float, default=0.9)
    args = p.parse_args()
    covered = dict.fromkeys(TRUE, 0)
    widths = []
    t0 = time.perf_counter()
    for i in range(args.studies):
        rng = np.random.default_rng(100 + i)
        fit = fit_power_law(
            *study(rng, args.runs, args.points, args.offset, args.noise),
            n_boot=args.boot,
            level=args.level,
            seed=i,
        )
        for name, true in TRUE.items():
            lo, hi = fit.interval[name]
            covered[name] += lo <= true <= hi
        widths.append(fit.interval["alpha"][1] - fit.interval["alpha"][0])
    seconds = (time.perf_counter() - t0) / args.studies
    out = {"studies": args.studies, "level": args.level}
    out.update({f"covered_{k}": round(v / args.studies, 3) for k, v in covered.items()})
    out.update({"median_alpha_width": round(float(np.median(widths)), 4)})
    out.update({"seconds_per_fit": round(seconds, 3), "boot": args.boot})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
