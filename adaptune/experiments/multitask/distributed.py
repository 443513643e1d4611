"""Data-parallel multitask runs under torchrun (`torchrun --nproc_per_node N --no-python adaptune run multitask`).

Every rank builds the same model (same seed) and follows the same round-robin plan, so every rank trains
the same dataset (and adaptune task) at each step. Each batch of the plan is split across the ranks
(rank r takes examples r, r+N, ...); each rank's loss is weighted by its share of the batch, and the
gradients are summed across ranks with one all-reduce per step, so every rank applies the gradient of
the whole batch (as one process would, up to float rounding) and the ranks' weights stay identical.
Gradients that are None (an inactive task's components, another dataset's head) are None on every rank
and are left out, as DistributedDataParallel with find_unused_parameters=True leaves them. Dev sets are
split by batch and the predictions gathered; only rank 0 writes the run directory.

With --fsdp (`shard`) the model is sharded by FSDP2 (fully_shard on each layer of its towers, then the model;
the components, in model.adaptune, fall into the model's group) and FSDP2 reduces its gradients in the
backward, as a mean over the ranks (gloo has no pre-multiplied sum for another divide factor); each rank's loss
is then weighted by its share times the number of ranks (`weight`), and the heads, whole on every rank, are
all-reduced as above and divided by the number of ranks. FSDP2's reduce-scatter needs the same parameters' gradients on every rank, so in mixed
batches the components of a task absent from one rank's share get a zero gradient there (adaptune's
`trainer_routing.AbsentTasks`, as AdapterTrainer does), and those of a task that no rank had go back to None
before the step. Every rank runs every dev batch (FSDP2 gathers each layer in a collective, so the ranks must run
the same forwards), and every rank takes part in saving the components (a collective: rank 0 writes).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ...errors import ConfigError


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    backend: str | None = None
    owned: bool = False  # the process group was set up here, and is closed by close()
    sharded: bool = False  # the model is sharded by FSDP2 (shard())

    @property
    def main(self) -> bool:
        return self.rank == 0

    def part(self, idx: list[int]) -> tuple[list[int], float]:
        """This rank's examples of a batch and their share of it. A rank left without any (a batch smaller
        than the world) runs the first example at weight 0, so its gradients have the same shapes."""
        mine = idx[self.rank::self.world]
        return (mine, len(mine) / len(idx)) if mine else (idx[:1], 0.0)

    def weight(self, share: float) -> float:
        """The weight of this rank's loss, its `share` of the batch: summed (or, under FSDP2, averaged) across the
        ranks, the weighted losses give the whole batch's gradient."""
        return share * self.world if self.sharded else share

    def reduce(self, params: list[torch.Tensor], loss: torch.Tensor) -> float:
        """Sum the gradients and the loss across ranks; the summed loss. A gradient present on some ranks only (a
        mixed batch whose share on this rank lacks a dataset) counts as zero where it is None; one that is None
        on every rank stays None, as in one process (AdamW then leaves the parameter and its moments alone)."""
        if self.world == 1:
            return loss.item()
        if self.sharded:  # FSDP2 reduced the model's gradients in the backward
            params = [p for p in params if not _is_dtensor(p)]
        present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
        dist.all_reduce(present)
        used = [p for p, n in zip(params, present.tolist()) if n > 0]
        for p in used:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in used]
        flat = torch.cat([g.reshape(-1) for g in grads] + [loss.detach().reshape(1).to(grads[0] if grads else loss)])
        dist.all_reduce(flat)
        if self.sharded:  # the losses were weighted for FSDP2's mean (weight())
            flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        return flat[-1].item()

    def clip(self, params: list[torch.Tensor], max_norm: float) -> float:
        """clip_grad_norm_ over `params` (FSDP2's shards and whole tensors alike); the norm before clipping."""
        if not self.sharded:
            return torch.nn.utils.clip_grad_norm_(params, max_norm).item()
        grads = [p.grad for p in params if p.grad is not None]
        shards = sum(g.to_local().double().pow(2).sum().cpu() for g in grads if _is_dtensor(g))
        total = torch.as_tensor(shards, dtype=torch.float64).to(grads[0].device if grads else "cpu")
        dist.all_reduce(total)  # nccl: on the device
        total = total.cpu() + sum(g.double().pow(2).sum().cpu() for g in grads if not _is_dtensor(g))
        norm = float(total.sqrt())
        coef = min(1.0, max_norm / (norm + 1e-6))
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
        return norm

    def dataset_means(self, parts: dict[str, float], names: list[str], datasets: list[str]) -> dict[str, float]:
        """Each dataset's mean loss over the whole mixed batch, from every rank's means over its share (`parts`,
        `names`: this rank's samples' datasets): what one process records; datasets in no rank's share left out."""
        if self.world == 1:
            return parts
        counts = [names.count(t) for t in datasets]
        sums = torch.tensor([parts.get(t, 0.0) * n for t, n in zip(datasets, counts)] + counts, dtype=torch.float64)
        dist.all_reduce(sums)
        k = len(datasets)
        return {t: (sums[i] / sums[k + i]).item() for i, t in enumerate(datasets) if sums[k + i] > 0}

    def gather(self, preds: dict[str, list]) -> dict[str, list[float]]:
        """Every rank's dev predictions (None where another rank predicted) merged into one list per dataset."""
        if self.world == 1:
            return preds
        parts: list = [None] * self.world
        dist.all_gather_object(parts, preds)
        return {t: [next(p[t][i] for p in parts if p[t][i] is not None) for i in range(len(v))] for t, v in preds.items()}

    def share(self, value: str | None) -> str | None:
        """Rank 0's `value` on every rank (a broadcast; the other ranks' `value` is ignored)."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self, ok: bool = True) -> None:
        """Leave the process group set up here: after a barrier when the run succeeded (a rank that failed
        alone must not wait for the others: torchrun stops them once it exits)."""
        if self.owned and dist.is_initialized():
            if ok:
                dist.barrier()
            dist.destroy_process_group()


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def shard(model: nn.Module, ranks: Ranks) -> None:
    """FSDP2 over the ranks (see the module doc): fully_shard on each layer of the model's towers, then the model.
    ConfigError without a layer stack."""
    from torch.distributed.fsdp import fully_shard

    from ...sites import SiteMap
    layers = [layer for tower in SiteMap(model).towers for layer in tower.layers]
    if not layers:
        raise ConfigError(f"--fsdp shards the model layer by layer, and no layer stack was found in "
                          f"{type(model).__name__}; drop --fsdp")
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    ranks.sharded = True


def setup(device: str, fsdp: bool = False) -> tuple[Ranks, str]:
    """The ranks of this process (torchrun's WORLD_SIZE, RANK, LOCAL_RANK; one rank without them) and its
    device: gloo on the CPU, nccl on CUDA with 'cuda' meaning cuda:LOCAL_RANK. ConfigError for `fsdp` in one
    process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if fsdp and world <= 1:
        raise ConfigError("--fsdp shards the model across torchrun's ranks, and this run has one process; run it "
                          "under torchrun --nproc_per_node N (N >= 2), or drop --fsdp")
    if world <= 1:
        return Ranks(), device
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if device != "cpu":
        torch.cuda.set_device(torch.device(device))
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo" if device == "cpu" else "nccl")
    return Ranks(dist.get_rank(), dist.get_world_size(), dist.get_backend(), owned), device
