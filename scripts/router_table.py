"""The before / after table of docs/study/router.md from the MLflow runs of
sweeps/router_recipe.yaml (study ``router-recipe``).

    .venv/bin/python scripts/router_table.py [--experiment router-recipe] [--tracking-uri URI]

One row per (layers, arm): test perplexity on the whole WikiText-2 test set (the sweep's
``eval:``), validation perplexity and mean depth at the end of training, the test set's mean
depth, each as the mean over seeds (per-seed values in brackets), and the ratio of mean test
perplexity to vanilla's at the same layers.
"""

from __future__ import annotations

import argparse
import statistics
import sys

ARMS = {  # (init_continue, router_lr_scale) -> label
    ("0.9", "1.0"): "adaptive, before (gate 0.9, router at lr)",
    ("0.5", "0.1"): "adaptive, defaults (gate 0.5, router at 0.1 lr)",
    ("0.4", "0.1"): "adaptive, gate 0.4, router at 0.1 lr",
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", default="router-recipe")
    ap.add_argument("--tracking-uri", default=None)
    args = ap.parse_args(argv)
    from mlflow.tracking import MlflowClient

    from alcot.orchestrator.config import alcot_home
    from alcot.orchestrator.tracking.stores import resolve_uri

    uri = args.tracking_uri or resolve_uri(None, alcot_home())[0]
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(args.experiment)
    if exp is None:
        print(f"error: no experiment {args.experiment!r} in {uri}", file=sys.stderr)
        return 2
    runs = client.search_runs([exp.experiment_id], "tags.config_hash != ''", max_results=5000)
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        p, m = r.data.params, r.data.metrics
        if "eval/wiki.test/ppl" not in m:
            continue
        if p["model.method"] == "vanilla":
            arm = "vanilla"
        else:
            key = (p.get("model.halting.init_continue"), p.get("model.halting.router_lr_scale"))
            arm = ARMS.get(key, f"adaptive {key}")
        layers = int(p["model.num_layers"])
        groups.setdefault((layers, arm), []).append(
            {
                "seed": int(p["seed"]),
                "test": m["eval/wiki.test/ppl"],
                "val": m.get("val/ppl", float("nan")),
                "depth": m.get("val/mean_depth", 0.0),
                "test_depth": m.get("eval/wiki.test/mean_depth", 0.0),
                "tokens": int(m.get("tokens_seen", 0)),
            }
        )
    print(
        "| layers | tokens | arm | seeds | test ppl (per seed) | / vanilla | val ppl "
        "| val mean depth (per seed) | test mean depth |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for layers in sorted({k[0] for k in groups}, reverse=True):
        van = groups.get((layers, "vanilla"), [])
        ref = statistics.mean(x["test"] for x in van) if van else None
        for (lay, arm), xs in sorted(groups.items(), key=lambda kv: (kv[0][1] != "vanilla", kv[0])):
            if lay != layers:
                continue
            xs = sorted(xs, key=lambda x: x["seed"])
            test = statistics.mean(x["test"] for x in xs)
            ratio = f"{test / ref:.3f}" if ref else "-"
            tests = ", ".join(f"{x['test']:.2f}" for x in xs)
            depths = ", ".join(f"{x['depth']:.2f}" for x in xs)
            val = statistics.mean(x["val"] for x in xs)
            depth = statistics.mean(x["depth"] for x in xs)
            test_depth = statistics.mean(x["test_depth"] for x in xs)
            print(
                f"| {layers} | {xs[0]['tokens'] / 1e6:.2f}M | {arm} | {len(xs)} "
                f"| {test:.2f} ({tests}) | {ratio} | {val:.2f} | {depth:.2f} ({depths}) "
                f"| {test_depth:.2f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
