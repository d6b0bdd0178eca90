"""How long `alcot sweep run --dry-run` takes to load and plan a large grid.

Writes a sweep of ``--trials`` trials (halting penalty x seed over the adaptive config), records
``--finished`` of them as FINISHED runs in a fresh sqlite store (so planning has runs to match),
then times ``load_sweep`` (expansion, validation, identities) and ``plan`` (one paged query for
the store's finished runs, a look at each run folder) side by side. Prints, last, one JSON line:
trials, finished, load_s, plan_s, per_trial_ms = (load_s + plan_s) / trials * 1000.
Target: planning 10,000 trials takes seconds (it took about 6 ms per trial with one tracking
query each before planning read the store once).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=10_000)
    p.add_argument("--finished", type=int, default=200)
    args = p.parse_args()
    home = Path(tempfile.mkdtemp(prefix="alcot-plan-"))
    os.environ["ALCOT_HOME"] = str(home)
    from alcot.orchestrator.sweeps.runner import plan
    from alcot.orchestrator.sweeps.spec import load_sweep
    from alcot.orchestrator.tracking.stores import default_store, ensure_experiment, open_client

    seeds = 10
    lambdas = ", ".join(f"{0.001 * (i + 1):.4f}" for i in range(args.trials // seeds))
    seed_list = ", ".join(map(str, range(seeds)))
    sweep_file = home / "big.yaml"
    sweep_file.write_text(
        f"study: plan-bench\nbase: {ROOT / 'configs' / 'train_adaptive.yaml'}\n"
        f"grid:\n  model.halting.lambda: [{lambdas}]\n  seed: [{seed_list}]\n"
        "budget: {tokens: 4096}\n"
    )
    t0 = time.perf_counter()
    sweep = load_sweep(sweep_file)
    load_s = time.perf_counter() - t0

    uri, root = default_store(home)
    client = open_client(uri)
    exp = ensure_experiment(client, "plan-bench", root)
    for trial in sweep.trials[: args.finished]:
        run = client.create_run(exp, tags={"config_hash": trial.hash})
        client.set_terminated(run.info.run_id, "FINISHED")

    t0 = time.perf_counter()
    planned = plan(sweep, home, log=lambda *a: None)
    plan_s = time.perf_counter() - t0
    skipped = sum(p.action == "skip" for p in planned)
    assert skipped == args.finished, (skipped, args.finished)
    n = len(sweep.trials)
    print(
        json.dumps(
            {
                "trials": n,
                "finished": skipped,
                "load_s": round(load_s, 2),
                "plan_s": round(plan_s, 2),
                "per_trial_ms": round((load_s + plan_s) / n * 1000, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
