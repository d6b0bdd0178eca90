"""Streamed data preparation: throughput, memory, and the parallel speed-up.

Generates a text corpus of ``--gb`` gigabytes at run time (no download: paragraphs of
Zipf-distributed pseudo-words with numbers, in 64 MB files), trains a byte-level BPE once on a
sample of it, then prepares it (``alcot.data.preparation``: stream, tokenise, write Megatron-Core
.bin/.idx shards) twice, each in its own process while this one samples the whole process
tree's resident memory every 0.1 s:

* with one tokenizer process (``data.workers: 1``) on the first ``--single-gb`` of the corpus:
  the single-process rate;
* with ``--workers`` processes (default 2) on the whole corpus.

Then trains 20 steps of a small model from the result (a token cache hit). Prints the
single-process rate and the other figures on the line before, and last one JSON line:
``mb_per_s`` (text megabytes tokenised per second by the parallel preparation, wall time of
``prepare``), ``peak_rss_mb`` (the process tree's peak during it) and ``tokens``. Targets:
``peak_rss_mb`` <= 1500 for 1 GB and flat when the corpus doubles (``--gb 2``), ``mb_per_s`` >=
1.6 x the single-process rate.

    nice -n 10 .venv/bin/python bench/data_prepare.py --gb 1
    .venv/bin/python bench/data_prepare.py --gb 0.05      # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

FILE_MB = 64

PREPARE = """
import json, sys, time
from alcot.data import DataConfig, prepare
folder, cache, tok, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
cfg = DataConfig(source="text", path=folder, split_paragraphs=True, tokenizer=tok,
                 workers=workers, seq_len=128)
t = time.perf_counter()
data = prepare(cfg, cache, log=lambda *a: None)
print(json.dumps({"seconds": time.perf_counter() - t, "tokens": data.n_train + data.n_val,
                  "shards": len(data.train_prefixes)}))
"""


def generate(folder: Path, gb: float, seed: int = 0) -> int:
    """Text files of paragraphs (blank-line separated) of Zipf-distributed pseudo-words."""
    import numpy as np

    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkqjxz"))
    vocab = []
    for _ in range(60_000):
        n = int(rng.integers(1, 11))
        vocab.append("".join(letters[np.minimum(rng.zipf(1.3, n) - 1, 25)]))
    vocab += [str(i) for i in range(1000)] + [",", ".", "and", "the", "of", "is"] * 50
    words = np.array(vocab, dtype=object)
    folder.mkdir(parents=True, exist_ok=True)
    total, target, i = 0, int(gb * 1e9), 0
    while total < target:
        size = min(FILE_MB * 1_000_000, target - total)
        parts, got = [], 0
        while got < size:
            idx = np.minimum(rng.zipf(1.2, 200_000) - 1, len(words) - 1)
            block = words[idx]
            block[rng.integers(60, 160) :: rng.integers(60, 160)] = "\n\n"  # paragraphs
            text = " ".join(block.tolist())
            parts.append(text)
            got += len(text)
        data = "".join(parts)[:size].encode()
        (folder / f"{i:05d}.txt").write_bytes(data)
        total += len(data)
        i += 1
    return total


def train_tokenizer(folder: Path, out: Path, sample_mb: int = 20) -> Path:
    from alcot.data.config import DataConfig
    from alcot.data.preparation import bpe_sample
    from alcot.data.tokenizer import train_bpe

    cfg = DataConfig(
        source="text",
        path=str(folder),
        split_paragraphs=True,
        vocab_size=8192,
        tokenizer_sample=sample_mb * 1_000_000,
    )
    tok = train_bpe(bpe_sample(cfg, {}), cfg.vocab_size)
    tok.save(str(out))
    return out


def tree_rss(proc) -> int:
    import psutil

    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total


def run_prepare(folder: Path, cache: Path, tok: Path, workers: int) -> dict:
    """``prepare`` in its own process; the process tree's peak RSS sampled from here."""
    import psutil

    proc = subprocess.Popen(
        [sys.executable, "-c", PREPARE, str(folder), str(cache), str(tok), str(workers)],
        stdout=subprocess.PIPE,
        text=True,
    )
    ps = psutil.Process(proc.pid)
    peak = [0]

    def watch():
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss(ps))
            time.sleep(0.1)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    out, _ = proc.communicate()
    t.join()
    if proc.returncode:
        raise SystemExit(f"prepare failed (exit {proc.returncode})")
    row = json.loads(out.strip().splitlines()[-1])
    row["peak_rss_mb"] = peak[0] / 2**20
    return row


def train_steps(folder: Path, tok: Path, home: Path, workers: int) -> str:
    env = dict(os.environ, ALCOT_HOME=str(home))
    root = Path(__file__).resolve().parents[1]
    args = [
        str(Path(sys.executable).parent / "alcot"), "train", "configs/train_adaptive.yaml",
        "--set", "data.source=text", "--set", f"data.path={folder}",
        "--set", "data.split_paragraphs=true", "--set", f"data.tokenizer={tok}",
        "--set", "data.vocab_size=null",
        "--set", f"data.workers={workers}", "--set", f"data.cache_dir={home / 'cache'}",
        "--set", "train.steps=20", "--set", "train.eval_every=20", "--set", "train.eval_batches=2",
        "--set", "train.checkpoint_every=20", "--set", "tracking.enabled=false",
        "--set", f"out_dir={home / 'run'}", "--no-progress",
    ]  # fmt: skip
    out = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"training failed:\n{out.stdout}\n{out.stderr}")
    return out.stdout.strip().splitlines()[-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gb", type=float, default=1.0, help="corpus size (GB of text)")
    p.add_argument(
        "--single-gb",
        type=float,
        default=None,
        help="corpus share for the single-process rate (default: min(gb, 0.128))",
    )
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    p.add_argument("--no-train", action="store_true", help="skip the 20 training steps")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        size = generate(root / "corpus", args.gb)
        gen_s = time.perf_counter() - t
        t = time.perf_counter()
        tok = train_tokenizer(root / "corpus", root / "tokenizer.json")
        bpe_s = time.perf_counter() - t
        single_gb = args.single_gb or min(args.gb, 0.128)
        sub = root / "single"
        sub.mkdir()
        files, got = sorted((root / "corpus").iterdir()), 0
        for f in files:  # the first files, as links
            if got >= single_gb * 1e9 and got:
                break
            (sub / f.name).symlink_to(f)
            got += f.stat().st_size
        one = run_prepare(sub, root / "cache1", tok, 1)
        single_rate = got / 1e6 / one["seconds"]
        par = run_prepare(root / "corpus", root / "cache", tok, args.workers)
        rate = size / 1e6 / par["seconds"]
        trained = "" if args.no_train else train_steps(root / "corpus", tok, root, args.workers)
        print(
            f"corpus {size / 1e6:.0f} MB generated in {gen_s:.0f} s; BPE (8192) on a 20 MB "
            f"sample in {bpe_s:.0f} s; single process: {single_rate:.2f} MB/s on "
            f"{got / 1e6:.0f} MB (peak {one['peak_rss_mb']:.0f} MB); {args.workers} workers: "
            f"{rate:.2f} MB/s = {rate / single_rate:.2f} x, {par['shards']} shards, "
            f"{par['seconds']:.0f} s; cpus {os.cpu_count()}, load {os.getloadavg()[0]:.1f}; "
            f"20 steps: {trained}"
        )
        print(
            json.dumps(
                {
                    "mb_per_s": round(rate, 3),
                    "peak_rss_mb": round(par["peak_rss_mb"], 1),
                    "tokens": int(par["tokens"]),
                }
            )
        )


if __name__ == "__main__":
    main()
