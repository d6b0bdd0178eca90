"""Training throughput of every method through the real trainer (``model/trainer.py`` ``train()``)
on real text, with the FLOPs each token really cost.

Each method trains ``--warmup + --steps`` optimizer steps of one size on WikiText-2 (the
training split, paragraphs as documents, a byte-level BPE trained on it and cached in
``$ALCOT_HOME/cache``); the trainer's own metrics give the tokens per second and the realised
FLOPs of the timed steps (read once at the end of warm-up and once at the end: the trainer keeps
its statistics on the device in between). Prints a table, then one JSON line:

  <method>_tps                tokens per second over the timed steps
  <method>_flops_per_token    realised FLOPs per token of the timed steps (forward + backward)
  time_vs_flops               (adaptive s/token / fixed s/token) /
                              (adaptive FLOPs/token / fixed FLOPs/token); target <= 1.10

The routers start untrained, so ``--tau`` and ``--init-continue`` (the router bias) are set such
that tokens halt at different depths from the start, as a trained router's do.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")

METHODS = ("vanilla", "looped", "pause", "ponder", "fixed", "adaptive", "mor")
WIKITEXT = "/work/shared/data/wikitext-2/wiki.train.tokens"


def run(method: str, args, data, root: Path) -> dict[str, float]:
    from alcot.model import ModelConfig
    from alcot.model.trainer import Callback, TrainerConfig, train

    class Marks(Callback):
        """The trainer's metrics at each reported step."""

        def __init__(self):
            self.at: dict[int, dict[str, float]] = {}

        def on_step_end(self, step, metrics):
            self.at[step] = dict(metrics)

    shape = {"size": args.size}
    for key, value in (
        ("num_layers", args.layers),
        ("hidden_size", args.hidden),
        ("num_attention_heads", args.heads),
    ):
        if value:
            shape[key] = value
    halting = {"tau": args.tau, "init_continue": args.init_continue}
    mcfg = ModelConfig.from_dict(
        {
            **shape,
            "method": method,
            "l_max": 0 if method == "vanilla" else args.l_max,
            "vocab_size": data.vocab_size,
            "max_seq_len": max(args.seq, 128),
            "halting": halting,
            "attention_kernel": args.kernel,
        }
    )
    total = args.warmup + args.steps
    tcfg = TrainerConfig(
        steps=total,
        batch_size=args.batch,
        lr=args.lr,
        log_every=args.warmup,  # reads at the end of warm-up and at the last step
        eval_every=10**9,
        eval_batches=1,
        checkpoint_every=10**9,
        precision=args.precision,
        threads=args.threads,
    )
    marks = Marks()
    t0 = time.perf_counter()
    res = train(mcfg, data, tcfg, 0, root / method, args.seq, [marks], progress=False,
                log=lambda *a: None, resume_from=None)  # fmt: skip
    wall = time.perf_counter() - t0
    if res.status != "finished":
        raise SystemExit(f"{method}: training failed: {res.message}")
    a, b = marks.at[args.warmup], marks.at[total]
    tokens = b["tokens_seen"] - a["tokens_seen"]
    return {
        "tps": b["throughput/tokens_per_s"],
        "flops_per_token": (b["flops/realised"] - a["flops/realised"]) / tokens,
        "mean_depth": b["train/mean_depth"],
        "wall_s": wall,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="micro")
    p.add_argument("--layers", type=int, default=0, help="override the size's layers (0: keep)")
    p.add_argument("--hidden", type=int, default=0)
    p.add_argument("--heads", type=int, default=0)
    p.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary trained on the data")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--l-max", type=int, default=3)
    p.add_argument("--tau", type=float, default=0.6)
    p.add_argument("--init-continue", type=float, default=0.85)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    p.add_argument("--kernel", choices=("auto", "sdpa", "flex"), default="auto")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--data", default=WIKITEXT, help="a text file (blank-line paragraphs)")
    args = p.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {METHODS}")
    if not Path(args.data).is_file():
        raise SystemExit(f"--data: no such file {args.data}")
    if args.warmup < 1 or args.steps < 1:
        raise SystemExit("--warmup and --steps must be >= 1")

    from alcot.data import prepare
    from alcot.data.config import DataConfig
    from alcot.orchestrator.config import alcot_home

    dcfg = DataConfig(
        source="text",
        path=args.data,
        split_paragraphs=True,
        vocab_size=args.vocab,
        seq_len=args.seq,
    )
    data = prepare(dcfg, alcot_home() / "cache", log=lambda *a: None)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            results[method] = run(method, args, data, Path(tmp))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(f"{'method':9s} {'tok/s':>10s} {'GFLOP/token':>12s} {'depth':>6s}  ({device}, "
          f"{args.size}, seq {args.seq} x batch {args.batch}, {os.cpu_count()} CPUs)")  # fmt: skip
    for m, r in results.items():
        print(f"{m:9s} {r['tps']:10.1f} {r['flops_per_token'] / 1e9:12.4f} {r['mean_depth']:6.2f}")
    line: dict[str, float | None] = {}
    for m, r in results.items():
        line[f"{m}_tps"] = round(r["tps"], 2)
        line[f"{m}_flops_per_token"] = round(r["flops_per_token"], 1)
    line["time_vs_flops"] = None
    if "adaptive" in results and "fixed" in results:
        a, f = results["adaptive"], results["fixed"]
        time_ratio = f["tps"] / a["tps"]  # (adaptive s/token) / (fixed s/token)
        line["time_vs_flops"] = round(time_ratio / (a["flops_per_token"] / f["flops_per_token"]), 4)
    print(json.dumps(line))


if __name__ == "__main__":
    main()
