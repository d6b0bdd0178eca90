"""One rank of the pipeline communication-device check (launched by test_pipeline.py).

``pp_device_worker.py WORK``: two pipeline stages over gloo run the pipeline's forward and
backward, a pipeline trainer step (its statistics broadcast), the gradient-norm reduction and
pipeline generation for adaptive latent CoT and Mixture-of-Recursions, while

* every tensor handed to torch.distributed (isend, irecv, send, recv, broadcast, all_reduce,
  all_gather, batch_isend_irecv) is recorded with its device, and must be on the pipeline's
  communication device (``pipeline.comm_device``: the model's device); and
* the default device of tensor factories is ``meta`` inside the pipeline code, so a tensor
  created without naming its device (a receive buffer, a header, the step statistics) lands on
  neither the CPU nor the model's device, and is caught. On a GPU such a tensor would be a CPU
  tensor, which NCCL refuses.

Rank 0 writes WORK/devices.json: {function: [devices seen]}."""

import json
import sys
import warnings
from collections import defaultdict

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")

FUNCS = (
    "isend",
    "irecv",
    "send",
    "recv",
    "broadcast",
    "all_reduce",
    "all_gather",
    "reduce_scatter",
    "batch_isend_irecv",
)


def main(work: str) -> None:
    from alcot.model import AlcotModel, ModelConfig, init_parallel, pipeline, trainer
    from alcot.model.generate import generate

    init_parallel(1, pipeline_parallel_size=2)
    rank = dist.get_rank()
    seen = defaultdict(list)
    expected = {"device": None}

    def tensors(args, kwargs):
        for a in list(args) + list(kwargs.values()):
            if isinstance(a, torch.Tensor):
                yield a
            elif isinstance(a, list | tuple):
                for x in a:
                    if isinstance(x, torch.Tensor):
                        yield x
                    elif isinstance(x, dist.P2POp):
                        yield x.tensor

    def recording(name, real):
        def wrapped(*args, **kwargs):
            for t in tensors(args, kwargs):
                seen[name].append(str(t.device))
                if t.device != expected["device"]:
                    raise RuntimeError(
                        f"torch.distributed.{name} got a tensor on {t.device}, not on the "
                        f"communication device {expected['device']}"
                    )
            return real(*args, **kwargs)

        return wrapped

    for name in FUNCS:
        setattr(dist, name, recording(name, getattr(dist, name)))

    def on_meta(fn):
        def wrapped(*args, **kwargs):
            torch.set_default_device("meta")
            try:
                return fn(*args, **kwargs)
            finally:
                torch.set_default_device(None)

        return wrapped

    pipeline.run_pipeline = on_meta(pipeline.run_pipeline)
    trainer.pipeline_step = on_meta(trainer.pipeline_step)
    g = torch.Generator().manual_seed(3)
    batches = [
        (torch.randint(0, 128, (2, 10), generator=g), torch.randint(0, 128, (2, 10), generator=g))
        for _ in range(2)
    ]

    class Loader:
        def __init__(self):
            self.i = 0

        def next_batch(self):
            self.i += 1
            return batches[self.i % 2]

    for case in (
        {"method": "adaptive", "halting": {"tau": 0.3}},
        {"method": "mor"},
    ):
        cfg = ModelConfig.from_dict(
            {
                "size": "tiny",
                "l_max": 3,
                "num_layers": 2,
                "hidden_size": 64,
                "num_attention_heads": 4,
                "num_query_groups": 2,
                "vocab_size": 128,
                "pipeline_parallel_size": 2,
                **case,
            }
        )
        torch.manual_seed(0)
        model = AlcotModel(cfg)
        expected["device"] = pipeline.comm_device(model)
        outs = pipeline.run_pipeline(model, [(x, y, None) for x, y in batches], True, 0.5)
        pipeline.broadcast_outputs(model, outs, 2)
        tcfg = trainer.TrainerConfig(batch_size=4, grad_accum=2)
        stats = trainer.pipeline_step(model, Loader(), tcfg, expected["device"], 1)
        assert stats.device == expected["device"] and stats.shape == (9,)
        params = [p for p in model.parameters() if p.grad is not None]
        trainer.clip_grad_norm(params, 1.0)
        generate(model, batches[0][0][:, :4], 2)
    if rank == 0:
        with open(f"{work}/devices.json", "w") as f:
            json.dump({k: [len(v), sorted(set(v))] for k, v in seen.items()}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])  # (test_pipeline's launcher also passes TP and PP: 1 and 2)
