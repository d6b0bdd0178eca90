"""What the orchestrator costs per trial on local Ray, with trivial trials (no training).

Runs N trials that each sleep ``--seconds`` through the same Tune set-up `alcot sweep run`
uses (function trainable, ``reuse_actors``, ``max_concurrent`` = workers, one CPU each) and
prints, last, one JSON line: trials, workers, per_trial_overhead_s = (wall - ideal) / trials
with ideal = ceil(trials / workers) * seconds, and utilisation = busy worker time /
(workers x wall). Ray's start-up is outside the measured wall (it is paid once per sweep).
Targets: overhead <= 1 s per trial, utilisation >= 0.9 for trials of 10 s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path


def sleeper(config: dict) -> None:
    from ray import tune

    start = time.time()
    time.sleep(config["seconds"])
    tune.report({"busy": time.time() - start})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seconds", type=float, default=10.0)
    args = p.parse_args()
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    home = Path(tempfile.mkdtemp(prefix="alcot-orch-"))
    from ray import tune

    from alcot.orchestrator.sweeps.ray_tune import in_home, init_ray

    with in_home(home):
        init_ray(None, home, log=print)
    tuner = tune.Tuner(
        tune.with_resources(sleeper, {"cpu": 1}),
        param_space={"seconds": args.seconds, "i": tune.grid_search(list(range(args.trials)))},
        tune_config=tune.TuneConfig(max_concurrent_trials=args.workers, reuse_actors=True),
        run_config=tune.RunConfig(storage_path=str(home / "ray_results"), verbose=0),
    )
    t = time.time()
    with in_home(home):
        results = tuner.fit()
    wall = time.time() - t
    busy = sum(r.metrics["busy"] for r in results)
    ideal = math.ceil(args.trials / args.workers) * args.seconds
    print(
        f"{args.trials} trials of {args.seconds:g} s on {args.workers} workers: wall {wall:.1f} s"
        f" (ideal {ideal:.1f} s)"
    )
    print(
        json.dumps(
            {
                "trials": args.trials,
                "workers": args.workers,
                "per_trial_overhead_s": round((wall - ideal) / args.trials, 3),
                "utilisation": round(busy / (args.workers * wall), 4),
            }
        )
    )


if __name__ == "__main__":
    main()
