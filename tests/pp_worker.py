"""One rank of the pipeline-parallel equivalence tests (launched by test_pipeline.py).

``pp_worker.py WORK TP PP``: for each case in WORK/cases.json, build the model at (TP, PP),
load the full checkpoint the test wrote, and run three optimizer steps (AdamW) over the
micro-batches in WORK/batch.pt with the pipeline schedule (forward and backward), after a short
greedy generation from the loaded weights. Rank 0 saves
the first step's outputs (loss, logits and depth of every micro-batch, gathered gradients) and
every step's losses and the final full weights."""

import json
import sys
import warnings

import torch

warnings.filterwarnings("ignore")


def main(work: str, tp: int, pp: int) -> None:
    from alcot.model import AlcotModel, ModelConfig, init_parallel
    from alcot.model.generate import generate
    from alcot.model.layouts import full_state_dict, load_full_state_dict
    from alcot.model.pipeline import Timeline, broadcast_outputs, run_pipeline

    init_parallel(tp, pipeline_parallel_size=pp)
    rank = torch.distributed.get_rank()
    with open(f"{work}/cases.json") as f:
        cases = json.load(f)
    batches = torch.load(f"{work}/batch.pt", weights_only=True)
    m = len(batches)
    for i, cfg_dict in enumerate(cases):
        cfg = ModelConfig.from_dict(
            {**cfg_dict, "tensor_parallel_size": tp, "pipeline_parallel_size": pp}
        )
        torch.manual_seed(1000 + rank)  # deliberately different: weights must come from the file
        model = AlcotModel(cfg)
        load_full_state_dict(model, torch.load(f"{work}/ckpt{i}.pt", weights_only=True))
        prompt = batches[0][0][:, :5]
        gen = generate(model, prompt, 4)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses, first = [], None
        for step in range(3):
            opt.zero_grad(set_to_none=True)
            tl = Timeline()
            outs = run_pipeline(model, batches, True, 1.0 / m, return_logits=True, timeline=tl)
            outs = broadcast_outputs(model, outs, m)
            losses.append([o.loss for o in outs])
            if step == 0:
                grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
                saved = {n: p.data for n, p in model.named_parameters()}
                for n, p in model.named_parameters():
                    p.data = grads[n] if n in grads else torch.zeros_like(p)
                full_grads = full_state_dict(model)
                for n, p in model.named_parameters():
                    p.data = saved[n]
                first = {
                    "logits": [o.logits for o in outs],
                    "loss": [o.loss for o in outs],
                    "depth": [o.depth for o in outs],
                    "grads": full_grads,
                    "events": len(tl.events),
                    "generated": (gen.tokens, gen.depth, gen.logits),
                }
            opt.step()
        final = full_state_dict(model)
        if rank == 0:
            torch.save({**first, "losses": losses, "final": final}, f"{work}/out{i}_{tp}x{pp}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
