"""Each arm's learning rate for sweeps/study_tokens.yaml, from the runs of
sweeps/study_tokens_lr.yaml (study ``study-tokens``): per arm (size, layers, method, token
budget, read off the sweep's own trials), the rate with the best final validation perplexity at
seed 0, printed as the sweep's ``overrides:`` block, with every rate's validation and test
perplexity as a comment and a warning when the best rate is at an edge of the rates tried.

    ALCOT_HOME=... ALCOT_WIKITEXT2=... .venv/bin/python scripts/study_rates.py \
        [--sweep sweeps/study_tokens_lr.yaml]
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", default="sweeps/study_tokens_lr.yaml")
    ap.add_argument("--tracking-uri", default=None)
    args = ap.parse_args(argv)
    from mlflow.tracking import MlflowClient

    from alcot.orchestrator.config import alcot_home
    from alcot.orchestrator.sweeps.spec import load_sweep
    from alcot.orchestrator.tracking.stores import resolve_uri

    uri = args.tracking_uri or resolve_uri(None, alcot_home())[0]
    sweep = load_sweep(args.sweep)
    tokens = {t.hash: t.axes.get("budget.tokens", t.tokens) for t in sweep.trials}
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(sweep.spec.study)
    if exp is None:
        print(f"error: no experiment {sweep.spec.study!r} in {uri}", file=sys.stderr)
        return 2
    arms: dict[tuple, dict[float, tuple[float, float]]] = defaultdict(dict)
    runs = client.search_runs(
        [exp.experiment_id], "attributes.status = 'FINISHED'", max_results=5000
    )
    for r in runs:
        p, m = r.data.params, r.data.metrics
        if "model.method" not in p or p.get("seed") != "0" or "val/ppl" not in m:
            continue
        if p["model.method"] == "adaptive" and float(p["model.halting.lambda"]) != 0.01:
            continue
        if r.data.tags.get("config_hash") not in tokens:
            continue
        n = tokens[r.data.tags["config_hash"]]
        arm = (p["model.size"], int(p["model.num_layers"]), p["model.method"], n)
        test = next(
            (v for k, v in m.items() if k.startswith("eval/") and k.endswith("/ppl")), math.nan
        )
        arms[arm][float(p["train.lr"])] = (m["val/ppl"], test)
    print("overrides:   # scripts/study_rates.py: best validation perplexity at seed 0")
    for (size, layers, method, n), rates in sorted(arms.items()):
        best = min(rates, key=lambda lr: rates[lr][0])
        tried = sorted(rates)
        edge = "  # EDGE of the rates tried" if best in (tried[0], tried[-1]) else ""
        shown = ", ".join(f"{lr:g}: {v:.2f}/{t:.2f}" for lr, (v, t) in sorted(rates.items()))
        print(f"  # {size} {layers} layers {method}, {n} tokens: lr: val/test ppl {shown}{edge}")
        when = f"model.size: {size}, model.num_layers: {layers}, model.method: {method}"
        print(f"  - when: {{{when}, budget.tokens: {n}}}")
        print(f"    set: {{train.lr: {best:g}}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
