"""One rank of tests/test_fsdp.py: FSDP2 (fully_shard on each decoder layer, then the root) on CPU with gloo.

    torchrun --nproc_per_node 2 fsdp_worker.py OUT

For each method of METHODS: the tiny Llama with the components attached, then sharded; STEPS SGD steps on this
rank's data shard; then, on every rank, save (one file), export_peft (LoRA, DoRA), save_sharded and load_sharded
(after the components were changed), load of the saved file into the sharded components, merge (refused) and a
last training step. The last method (lora) also checks the errors of mismatched calls. Rank R writes OUT/rank{R}.pt:
per method the components gathered whole (torch's own DTensor.full_tensor) after training and after the last
step, what each call returned or raised; then rank 1 leaves and rank 0 saves alone (OUT/alone.txt: the error).
"""
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from helpers import VOCAB, caught, perturb, tiny_llama
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard

import adaptune.save_format as save_format
from adaptune import Adapter, DoRA, LoRA, Prefix, PromptTuning, attach, export_peft, load

STEPS = 3
LR = 0.5
METHODS = {  # LoRA's attn rank 3 shards unevenly over 2 ranks (2 rows and 1)
    "lora": lambda: {"attn": LoRA(3), "ffn": LoRA(4)},
    "dora": lambda: {"attn": DoRA(2), "ffn": DoRA(2)},
    "adapter": lambda: {"ffn": Adapter(8)},
    "prefix": lambda: {"attn": Prefix(4)},
    "prompt": lambda: {"embed": PromptTuning(3)},
    "routed": lambda: {"attn": LoRA(2)},  # shared, beside the tasks of TASKS: each batch routes a sample to each
}
TASKS = {"routed": lambda: {"a": {"ffn": LoRA(2)}, "b": {"ffn": Adapter(4), "attn.o": DoRA(2)}}}
ROUTE = ["a", "b"]  # the tasks of a batch's two samples (method "routed")


def build(method: str):
    model = tiny_llama(seed=0)  # no dropout anywhere: comparable to one process
    adaptation = attach(model, METHODS[method](), tasks=TASKS[method]() if method in TASKS else None)
    perturb(adaptation)  # off the identity start: every factor gets a first-order gradient from the first step
    model.train()
    return model, adaptation


def shard_model(model) -> None:
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)


def shard(rank: int, step: int) -> torch.Tensor:
    """This rank's batch at `step`: different on every rank."""
    return torch.randint(2, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1000 * rank + step))


def loss_of(model, adaptation, ids: torch.Tensor) -> torch.Tensor:
    """The language-model loss of a batch; with tasks, inside a route() giving each sample its task."""
    if not adaptation.task_names:
        return model(ids, labels=ids).loss
    with adaptation.route(ROUTE[:len(ids)]):
        return model(ids, labels=ids).loss


def train_step(model, adaptation, opt, rank: int, step: int) -> None:
    ids = shard(rank, step)
    loss = loss_of(model, adaptation, ids)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def whole(adaptation) -> dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in adaptation.state_dict().items()}


def change(adaptation) -> None:
    with torch.no_grad():
        for p in adaptation.parameters():
            p.add_(1.0)


def run(method: str, out: Path, rank: int, writes: list) -> dict:
    model, adaptation = build(method)
    shard_model(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    for step in range(STEPS):
        train_step(model, adaptation, opt, rank, step)
    res = {"final": whole(adaptation), "sharded": type(next(adaptation.parameters())).__name__}
    before = len(writes)
    res["saved"] = str(adaptation.save(out / f"{method}.safetensors"))
    res["writes"] = len(writes) - before
    if method in ("lora", "dora"):
        res["peft"] = str(export_peft(model, out / f"peft-{method}"))
    res["dcp"] = str(adaptation.save_sharded(out / f"dcp-{method}"))
    local = {k: v.to_local().clone() for k, v in adaptation.state_dict().items()}
    change(adaptation)
    res["changed"] = not torch.equal(next(iter(whole(adaptation).values())), next(iter(res["final"].values())))
    adaptation.load_sharded(out / f"dcp-{method}")
    res["dcp_local_exact"] = all(torch.equal(v.to_local(), local[k]) for k, v in adaptation.state_dict().items())
    res["dcp_exact"] = all(torch.equal(v, res["final"][k]) for k, v in whole(adaptation).items())
    change(adaptation)
    res["load_returned"] = load(model, out / f"{method}.safetensors") is adaptation
    res["load_exact"] = all(torch.equal(v, res["final"][k]) for k, v in whole(adaptation).items())
    res["merge"] = caught(adaptation.merge)
    train_step(model, adaptation, opt, rank, STEPS)  # training goes on after the gathers and loads
    res["after"] = whole(adaptation)
    if method == "lora":
        res["errors"] = mismatches(model, adaptation, out, rank)
    return res


def mismatches(model, adaptation, out: Path, rank: int) -> dict:
    """Calls that do not fit: each gives an AdaptuneError on every rank, and the ranks go on together."""
    errors = {}
    if rank == 0:  # a file of other components; one of the same stacks with a tensor cut short; a busy directory
        attach(tiny_llama(seed=0), {"attn": LoRA(2)}).save(out / "other.safetensors")
        with safe_open(str(out / "lora.safetensors"), framework="pt") as f:
            tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        name = next(iter(tensors))
        tensors[name] = tensors[name][:-1].clone()
        save_file(tensors, str(out / "cut.safetensors"), metadata=meta)
        (out / "busy").mkdir()
        (out / "busy" / "notes.txt").write_text("kept")
    dist.barrier()
    errors["other_spec"] = caught(lambda: load(model, out / "other.safetensors"))
    errors["shapes"] = caught(lambda: load(model, out / "cut.safetensors"))
    errors["busy_dir"] = caught(lambda: adaptation.save_sharded(out / "busy"))
    errors["paths"] = caught(lambda: adaptation.save(out / f"rank{rank}-own.safetensors"))
    errors["calls"] = caught(lambda: adaptation.save(out / "lora.safetensors") if rank == 0
                             else load(model, out / "lora.safetensors"))
    errors["missing_dir"] = caught(lambda: adaptation.load_sharded(out / "no-such-dir"))
    errors["other_dcp"] = caught(lambda: adaptation.load_sharded(out / "dcp-dora"))
    bare = tiny_llama(seed=0)
    shard_model(bare)
    errors["bare_load"] = caught(lambda: load(bare, out / "lora.safetensors"))
    late = tiny_llama(seed=0)
    shard_model(late)
    errors["late_attach"] = caught(lambda: attach(late, {"attn": LoRA(2)}))
    errors["late_attach_left_nothing"] = str(hasattr(late, "adaptune"))
    errors["still_together"] = str(adaptation.save(out / "lora-again.safetensors"))
    return errors


def main(out: str) -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    dist.init_process_group("gloo")
    rank, out = dist.get_rank(), Path(out)
    writes = []
    atomic_write = save_format.atomic_write

    def counted(*args, **kwargs):
        writes.append(args[0])
        return atomic_write(*args, **kwargs)
    save_format.atomic_write = counted
    results = {"rank": rank, "world": int(os.environ["WORLD_SIZE"]), "backend": dist.get_backend()}
    for method in ("dora", "adapter", "prefix", "prompt", "routed", "lora"):  # lora last: it checks errors with dcp-dora
        results[method] = run(method, out, rank, writes)
    torch.save(results, out / f"rank{rank}.pt")
    model, adaptation = build("lora")
    shard_model(model)
    dist.barrier()
    if rank == 1:  # leaves: rank 0 saves alone
        dist.destroy_process_group()
        return
    (out / "alone.txt").write_text(caught(lambda: adaptation.save(out / "alone.safetensors")))
    os._exit(0)  # its group's peer is gone: skip the destructors, whose gloo threads may abort at exit


if __name__ == "__main__":
    main(sys.argv[1])
