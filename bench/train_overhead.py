"""What MLflow tracking costs a training step, measured side by side in one run.

Trains the same config with tracking off and with tracking to the embedded MLflow store
(sqlite), alternating the two for several rounds. A step's cost is the wall time between
consecutive metric callbacks (so it includes the tracker's own work in the training thread and
any contention from its background sender); evaluation steps are left out. Prints, last, one
JSON line: step_s_no_tracking, step_s_mlflow (medians over all rounds) and
overhead = step_s_mlflow / step_s_no_tracking - 1. Target: overhead <= 0.03.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")


def run_once(config, overrides, tracked: bool, root: Path, tag: str) -> list[float]:
    from alcot.data.preparation import prepare
    from alcot.model.trainer import Callback, train
    from alcot.orchestrator.config import alcot_home, config_hash, flatten, load_run_config
    from alcot.orchestrator.tracking.stores import resolve_uri
    from alcot.orchestrator.tracking.tracker import Tracker
    from alcot.orchestrator.training_run import TrackMetrics, resolve

    class StepTimer(Callback):
        def __init__(self):
            self.last = None
            self.intervals: list[float] = []

        def on_step_end(self, step, metrics):
            now = time.perf_counter()
            if self.last is not None and "val/loss" not in metrics:
                self.intervals.append(now - self.last)
            self.last = now

    cfg = load_run_config(config, [*overrides, "train.resume=never"])
    data = prepare(cfg.data, alcot_home() / "cache", log=lambda *a: None)
    resolved = resolve(cfg, data.vocab_size)
    out_dir = root / tag
    timer = StepTimer()
    callbacks = [timer]
    tracker = None
    if tracked:
        uri, art = resolve_uri(None, alcot_home())
        tracker = Tracker(
            uri,
            "bench-overhead",
            out_dir,
            tag,
            artifact_root=art,
            tags={"config_hash": config_hash(cfg)},
            flush_seconds=cfg.tracking.flush_seconds,
            log=lambda *a: None,
        )
        tracker.log_params(flatten(resolved.to_dict()))
        callbacks = [TrackMetrics(tracker), timer]  # the tracker as run_training wires it
    train(
        resolved.model,
        data,
        cfg.train,
        cfg.seed,
        out_dir,
        cfg.data.seq_len,
        callbacks=callbacks,
        progress=False,
        log=lambda *a: None,
    )
    if tracker:
        assert tracker.finish("FINISHED"), "metrics were not all sent"
    return timer.intervals


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/train_adaptive.yaml")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--set", action="append", default=[], help="extra config overrides")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="alcot-bench-"))
    os.environ.setdefault("ALCOT_HOME", str(root / "home"))
    overrides = [
        f"train.steps={args.steps}",
        f"train.eval_every={args.steps}",
        "train.checkpoint_every=100000",
        "train.log_every=1",
        "data.seq_len=64",
        "train.batch_size=8",
        *args.set,
    ]
    plain, tracked = [], []
    run_once(args.config, [*overrides, "train.steps=3"], False, root, "warmup")
    for r in range(args.rounds):
        plain += run_once(args.config, overrides, False, root, f"plain{r}")
        tracked += run_once(args.config, overrides, True, root, f"mlflow{r}")
    a, b = statistics.median(plain), statistics.median(tracked)
    print(f"steps timed: {len(plain)} without tracking, {len(tracked)} with MLflow (sqlite)")
    print(f"median step: {a * 1000:.1f} ms without tracking, {b * 1000:.1f} ms with MLflow")
    print(
        json.dumps(
            {
                "step_s_no_tracking": round(a, 5),
                "step_s_mlflow": round(b, 5),
                "overhead": round(b / a - 1, 4),
            }
        )
    )


if __name__ == "__main__":
    main()
