"""Training-step speed of vanilla, fixed-depth and adaptive latent CoT at one size, side by side.

Prints a table, then one JSON line (the figure of record):
  vanilla_s, fixed_s, adaptive_s  seconds per training step (forward + backward + AdamW),
                                  median over the timed steps, after warm-up
  l_max, mean_depth               the adaptive model's measured mean executed latent depth
  ratio = adaptive_s / fixed_s    what pruning buys in wall-clock
  ideal = (1 + mean_depth) / (1 + l_max)   what it would buy if only executed passes cost time
  gemm_flops_per_s                a dense fp32 matmul measured in the same run
  mfu                             vanilla realised FLOPs per second / gemm_flops_per_s
  realised_ratio                  adaptive realised FLOPs / fixed realised FLOPs (timed steps)
  latent_overhead = fixed_s / ((1 + l_max) * vanilla_s)   what a latent pass costs beyond a
                                  plain one (packing, caches, halting, mixing)
  l0_ratio = l0_s / vanilla_s     method adaptive with l_max = 0 against vanilla
and before it, as text, kernel_ratio: the adaptive model's kernel FLOPs / realised FLOPs.
Targets: ratio <= 1.10 * ideal; ratio <= 1.05 * realised_ratio; latent_overhead <= 1.10;
l0_ratio <= 1.05.
``--dtype bf16`` runs every model in bf16 (model/precision.py); ``--spec te`` on a GPU uses the
TransformerEngine layers.

The untrained router would keep nearly every token (g starts near 0.9), so the adaptive model's
router gets a spread of weights and tau = 0.6, which prunes a good share of tokens at each step,
as a trained router does; the measured mean depth is what `ideal` uses.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore")


# glibc hands large freed blocks back to the OS, and the next step faults them in again; on the
# VMs this was measured on that cost up to 3x a training step, differently per model (a step's
# time depended on which model ran before it). Keeping freed memory in the heap makes the
# variants comparable. Applied by re-executing the script once with these set.
ALLOCATOR_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
    "MALLOC_TRIM_THRESHOLD_": str(64 * 2**30),
    "MALLOC_TOP_PAD_": str(2**30),
}


def pin_allocator() -> None:
    """Re-execute this process with :data:`ALLOCATOR_ENV` unless it is already set."""
    if all(os.environ.get(k) == v for k, v in ALLOCATOR_ENV.items()):
        return
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **ALLOCATOR_ENV})


def gemm_flops_per_s(device="cpu", dtype=torch.float32, n: int = 1024, reps: int = 20) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    if device != "cpu":
        n, reps = 8192, 50  # a GPU needs a big product to reach its peak
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device != "cpu":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device != "cpu":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The model and batch options the model benchmarks share."""
    p.add_argument("--size", default="tiny", help="ladder size the shape options override")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--l-max", type=int, default=3)
    p.add_argument("--tau", type=float, default=0.6)
    p.add_argument("--router-std", type=float, default=0.15)
    p.add_argument(
        "--embed-scale", type=float, default=None, help="model.embed_scale (default: sqrt(2.5 d))"
    )
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--spec", choices=("auto", "local", "te"), default="auto")
    p.add_argument("--kernel", choices=("auto", "sdpa", "flex"), default="auto")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0: torch's default); 1 keeps a loaded machine's thread "
        "contention out of small per-token ops",
    )


def make(method: str, args, l_max: int | None = None, recompute: str = "none", **halting):
    """A model of the benchmark's shape (``--size`` with ``0`` meaning the ladder's value)."""
    from alcot.model import AlcotModel, ModelConfig
    from alcot.model.precision import cast_model

    torch.manual_seed(0)
    shape = dict(
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        vocab_size=args.vocab,
    )
    cfg = ModelConfig.from_dict(
        dict(
            size=args.size,
            method=method,
            l_max=args.l_max if l_max is None else l_max,
            embed_scale=args.embed_scale,
            halting=halting,
            spec=args.spec,
            attention_kernel=args.kernel,
            recompute=recompute,
            max_seq_len=max(2048, args.seq + 512),
            **{k: v for k, v in shape.items() if v},
        )
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    model = AlcotModel(cfg)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = cast_model(model, dtype).to(args.device)
    if model.router is not None:
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            w = model.router.steps[0].weight
            w.copy_(torch.randn(w.shape, generator=gen) * args.router_std)
    return model


def compared_models(args) -> dict:
    """vanilla, fixed-depth and adaptive at the benchmark's shape, the adaptive router spread
    so that tokens halt at different depths (``--tau``, ``--router-std``)."""
    return {
        "vanilla": make("vanilla", args),
        "fixed": make("fixed", args),
        "adaptive": make("adaptive", args, tau=args.tau, **{"lambda": 0.01}),
    }


def time_steps(model, x, y, warmup: int, steps: int):
    # lr = 0: the optimizer does all its work, but the weights (and so the router's depth) stay
    # put, so every timed step runs the same depth and mean_depth describes all of them.
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)
    times, out = [], None
    cuda = x.is_cuda
    for i in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = model(x, y)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds; medians of all")
    args = p.parse_args()
    pin_allocator()

    from alcot.model import init_parallel

    init_parallel(1)
    models = {**compared_models(args), "adaptive_l0": make("adaptive", args, l_max=0)}
    vocab = models["vanilla"].cfg.vocab_size
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(args.device)
    y = torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(args.device)
    samples = {k: [] for k in models}
    outs = {}
    gemm = []
    for _ in range(args.rounds):  # interleave so that machine noise hits every variant alike
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        gemm.append(gemm_flops_per_s(args.device, dtype))
        for name, model in models.items():
            t, outs[name] = time_steps(model, x, y, args.warmup, args.steps)
            samples[name].append(t)
    sec = {k: statistics.median(v) for k, v in samples.items()}
    gemm_fps = statistics.median(gemm)
    mean_depth = outs["adaptive"].mean_depth
    ideal = (1 + mean_depth) / (1 + args.l_max)
    ratio = sec["adaptive"] / sec["fixed"]
    mfu = outs["vanilla"].flops["realised"] / sec["vanilla"] / gemm_fps
    realised_ratio = outs["adaptive"].flops["realised"] / outs["fixed"].flops["realised"]
    overhead = sec["fixed"] / ((1 + args.l_max) * sec["vanilla"])
    l0_ratio = sec["adaptive_l0"] / sec["vanilla"]
    kernel_ratio = outs["adaptive"].flops["kernel"] / outs["adaptive"].flops["realised"]

    print(f"{'model':10s} {'s/step':>8s} {'depth':>6s} {'realised GFLOP':>15s} {'tok/s':>8s}")
    for name in models:
        o = outs[name]
        print(
            f"{name:10s} {sec[name]:8.3f} {o.mean_depth:6.2f} {o.flops['realised'] / 1e9:15.2f}"
            f" {args.batch * args.seq / sec[name]:8.0f}"
        )
    print(
        f"dense {args.dtype} GEMM: {gemm_fps / 1e9:.1f} GFLOP/s; threads={torch.get_num_threads()}"
    )
    print(f"ratio {ratio:.3f} vs ideal {ideal:.3f} (target ratio <= {1.1 * ideal:.3f})")
    print(
        f"ratio vs realised_ratio {realised_ratio:.3f} (target <= {1.05 * realised_ratio:.3f}); "
        f"latent_overhead {overhead:.3f} (target <= 1.10); l0_ratio {l0_ratio:.3f} (<= 1.05)"
    )
    print(f"kernel_ratio {kernel_ratio:.4f} (adaptive kernel / realised FLOPs); dtype {args.dtype}")
    print(
        json.dumps(
            {
                "vanilla_s": round(sec["vanilla"], 4),
                "fixed_s": round(sec["fixed"], 4),
                "adaptive_s": round(sec["adaptive"], 4),
                "l_max": args.l_max,
                "mean_depth": round(mean_depth, 4),
                "ratio": round(ratio, 4),
                "ideal": round(ideal, 4),
                "gemm_flops_per_s": round(gemm_fps),
                "mfu": round(mfu, 4),
                "realised_ratio": round(realised_ratio, 4),
                "latent_overhead": round(overhead, 4),
                "l0_ratio": round(l0_ratio, 4),
            }
        )
    )


if __name__ == "__main__":
    main()
