"""Data-parallel multitask runs under torchrun (`torchrun --nproc_per_node N --no-python adaptune run multitask`).

Every rank builds the same model (same seed) and follows the same round-robin plan, so every rank trains
the same dataset (and adaptune task) at each step. Each batch of the plan is split across the ranks
(rank r takes examples r, r+N, ...); each rank's loss is weighted by its share of the batch, and the
gradients are summed across ranks with one all-reduce per step, so every rank applies the gradient of
the whole batch (as one process would, up to float rounding) and the ranks' weights stay identical.
Gradients that are None (an inactive task's components, another dataset's head) are None on every rank
and are left out, as DistributedDataParallel with find_unused_parameters=True leaves them. Dev sets are
split by batch and the predictions gathered; only rank 0 writes the run directory.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    backend: str | None = None
    owned: bool = False  # the process group was set up here, and is closed by close()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def part(self, idx: list[int]) -> tuple[list[int], float]:
        """This rank's examples of a batch and their share of it. A rank left without any (a batch smaller
        than the world) runs the first example at weight 0, so its gradients have the same shapes."""
        mine = idx[self.rank::self.world]
        return (mine, len(mine) / len(idx)) if mine else (idx[:1], 0.0)

    def reduce(self, params: list[torch.Tensor], loss: torch.Tensor) -> float:
        """Sum the gradients and the loss across ranks; the summed loss. A gradient present on some ranks only (a
        mixed batch whose share on this rank lacks a dataset) counts as zero where it is None; one that is None
        on every rank stays None, as in one process (AdamW then leaves the parameter and its moments alone)."""
        if self.world == 1:
            return loss.item()
        present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
        dist.all_reduce(present)
        used = [p for p, n in zip(params, present.tolist()) if n > 0]
        for p in used:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in used]
        flat = torch.cat([g.reshape(-1) for g in grads] + [loss.detach().reshape(1).to(grads[0] if grads else loss)])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        return flat[-1].item()

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

    def close(self, ok: bool = True) -> None:
        """Leave the process group set up here: after a barrier when the run succeeded (a rank that failed
        alone must not wait for the others: torchrun stops them once it exits)."""
        if self.owned and dist.is_initialized():
            if ok:
                dist.barrier()
            dist.destroy_process_group()


def setup(device: str) -> tuple[Ranks, str]:
    """The ranks of this process (torchrun's WORLD_SIZE, RANK, LOCAL_RANK; one rank without them) and its
    device: gloo on the CPU, nccl on CUDA with 'cuda' meaning cuda:LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
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
