"""One rank of the tensor-parallel equivalence test (launched twice by test_tensor_parallel.py).

For each case: build the model at tensor-parallel size 2, load the full (TP=1) checkpoint the
test wrote, run forward and backward, and (rank 0) save logits, loss, depth and the gathered
gradients."""

import json
import sys
import warnings

import torch

warnings.filterwarnings("ignore")


def main(work: str) -> None:
    from alcot.model import AlcotModel, ModelConfig, init_parallel
    from alcot.model.layouts import full_state_dict, load_full_state_dict

    init_parallel(2)
    rank = torch.distributed.get_rank()
    with open(f"{work}/cases.json") as f:
        cases = json.load(f)
    for i, cfg_dict in enumerate(cases):
        cfg = ModelConfig.from_dict({**cfg_dict, "tensor_parallel_size": 2})
        torch.manual_seed(1000 + rank)  # deliberately different: weights must come from the file
        model = AlcotModel(cfg)
        state = torch.load(f"{work}/ckpt{i}.pt", weights_only=True)
        load_full_state_dict(model, state)
        regathered = full_state_dict(model)
        same = all(
            torch.equal(regathered[k], v) for k, v in state.items() if isinstance(v, torch.Tensor)
        )
        x, y = torch.load(f"{work}/batch.pt", weights_only=True)
        out = model(x, y, return_logits=True)
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        # gather gradient shards the same way as weights
        holder = {n: p for n, p in model.named_parameters()}
        for n, p in holder.items():
            p.data = grads[n] if n in grads else torch.zeros_like(p)
        full_grads = full_state_dict(model)
        if rank == 0:
            torch.save(
                {
                    "logits": out.logits.detach(),
                    "loss": out.loss.detach(),
                    "depth": out.depth,
                    "grads": full_grads,
                    "roundtrip": same,
                },
                f"{work}/out{i}.pt",
            )
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
