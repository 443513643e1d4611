"""One rank of the scale-out tests (tests/test_distributed.py): run under torchrun or accelerate launch.

    python distributed_worker.py LAUNCHER CASE OUT [--find-unused]

LAUNCHER: torchrun (DDP by hand, gloo) or accelerate (Accelerator().prepare). CASE: shared (LoRA on attn)
or tasks (shared LoRA + per-task adapters, tasks alternating a, b, a, b; every rank runs the same task at a
step). Each rank trains STEPS steps on its own data shard (seeded by rank and step) and writes OUT/rank{R}.pt:
the components' initial and final state_dict and, per step, each component parameter's gradient after the
all-reduce (None where the parameter got none).
"""
import os
import sys

import torch
import torch.distributed as dist
from helpers import VOCAB, tiny_gpt2

from adaptune import LoRA, Adapter, attach

STEPS = 4


def build(case: str):
    model = tiny_gpt2(seed=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # no dropout: comparable to one process
    tasks = {"a": {"ffn": Adapter(8)}, "b": {"ffn": Adapter(8)}} if case == "tasks" else None
    adaptation = attach(model, {"attn": LoRA(4)}, tasks=tasks)
    model.train()
    return model, adaptation


def shard(rank: int, step: int) -> torch.Tensor:
    """This rank's batch at `step`: different on every rank."""
    return torch.randint(2, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1000 * rank + step))


def main(launcher: str, case: str, out: str, find_unused: bool) -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    model, adaptation = build(case)
    init = {k: v.detach().clone() for k, v in model.adaptune.state_dict().items()}
    names = {p: n for n, p in model.adaptune.named_parameters()}
    if launcher == "torchrun":
        dist.init_process_group("gloo")
        rank, how = dist.get_rank(), f"DDP {dist.get_backend()}"
        # find_unused_parameters: per-task components of the inactive task get no gradient in a step
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=find_unused)
        opt = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=1e-2)
    else:
        from accelerate import Accelerator, DistributedDataParallelKwargs
        acc = Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused)])
        rank, how = acc.process_index, f"{acc.distributed_type.value} {acc.state.backend}"
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        ddp, opt = acc.prepare(model, opt)
    grads = []
    for step in range(STEPS):
        if case == "tasks":
            adaptation.use("ab"[step % 2])
        ids = shard(rank, step)
        loss = ddp(ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        if launcher == "torchrun":
            loss.backward()
        else:
            acc.backward(loss)
        grads.append({names[p]: None if p.grad is None else p.grad.detach().clone()
                      for p in model.adaptune.parameters()})
        opt.step()
    final = {k: v.detach().clone() for k, v in model.adaptune.state_dict().items()}
    torch.save({"rank": rank, "world": int(os.environ["WORLD_SIZE"]), "init": init, "final": final, "grads": grads,
                "wrapped": type(ddp).__name__, "how": how}, os.path.join(out, f"rank{rank}.pt"))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], "--find-unused" in sys.argv)
