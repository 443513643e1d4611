"""The pieces of one multitask training run: losses, the round-robin and mixed batch orders, and evaluation
(pooled encoding and the learning-rate schedule are common/training.py's)."""
from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..common.datasets import BINARY, CLASSES
from ..common.training import EVAL_BATCH, Encoder


def loss_of(kind: str, out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """classes: cross entropy; binary: BCE on one logit; regression: MSE on one output."""
    if kind == CLASSES:
        return F.cross_entropy(out, labels.long())
    if kind == BINARY:
        return F.binary_cross_entropy_with_logits(out.squeeze(-1), labels)
    return F.mse_loss(out.squeeze(-1), labels)


def predictions(kind: str, out: torch.Tensor) -> list[float]:
    if kind == CLASSES:
        return out.argmax(-1).float().tolist()
    if kind == BINARY:
        return (out.squeeze(-1) > 0).float().tolist()
    return out.squeeze(-1).float().tolist()


def schedule(sizes: dict[str, int], batch_size: int, seed: int, epoch: int) -> list[tuple[str, list[int]]]:
    """One epoch's (dataset, example indices) batches: each dataset shuffled (seeded by seed, epoch and
    its position), then the datasets take turns batch by batch until each has used all its batches."""
    queues = {}
    for i, (t, n) in enumerate(sizes.items()):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch * 31 + i)).tolist()
        queues[t] = [order[j:j + batch_size] for j in range(0, n, batch_size)]
    out, k = [], 0
    while any(k < len(q) for q in queues.values()):
        out += [(t, q[k]) for t, q in queues.items() if k < len(q)]
        k += 1
    return out


def mixed_schedule(sizes: dict[str, int], batch_size: int, seed: int, epoch: int) -> list[list[tuple[str, int]]]:
    """One epoch's mixed batches of (dataset, example index): every example of every dataset shuffled together
    (seeded by seed and epoch), cut into batches, each batch ordered by dataset."""
    pairs = [(t, i) for t, n in sizes.items() for i in range(n)]
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed * 1000 + epoch * 31 + 7)).tolist()
    rank = {t: k for k, t in enumerate(sizes)}
    return [sorted((pairs[j] for j in order[k:k + batch_size]), key=lambda p: rank[p[0]])
            for k in range(0, len(order), batch_size)]


def mixed_loss(kinds: dict[str, str], heads: nn.ModuleDict, pooled: torch.Tensor, batch: list[tuple[str, int]],
               labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """A mixed batch's loss: each dataset's mean loss (its head on its samples) weighted by its share of the
    batch, so every sample weighs the same; and each dataset's mean loss."""
    total, parts = pooled.new_zeros(()), {}
    for t in dict.fromkeys(name for name, _ in batch):
        rows = torch.tensor([k for k, (name, _) in enumerate(batch) if name == t], device=pooled.device)
        loss = loss_of(kinds[t], heads[t](pooled[rows]), labels[rows])
        total = total + loss * (len(rows) / len(batch))
        parts[t] = loss.item()
    return total, parts


def routed(adaptation: Any, tasks: list[str]):
    """adaptation.route(tasks) (a task per sample), or nothing to do without an adaptation."""
    return adaptation.route(tasks) if adaptation is not None else contextlib.nullcontext()


@torch.no_grad()
def evaluate(encoder: Encoder, heads: nn.ModuleDict, adaptation: Any, data: dict, batch_size: int = EVAL_BATCH,
             progress: Any = None, shard: tuple[int, int] = (0, 1), mixed: bool = False) -> dict[str, list[float]]:
    """Dev predictions per dataset, in file order. Batches hold examples of similar length (sorted by
    character length) to cut padding; masked padding leaves each prediction mathematically unchanged.
    mixed: every dataset's examples in the same batches, each through its dataset's task (adaptation.route).
    shard=(rank, world): only every world-th batch from rank's; the others' predictions are None."""
    encoder.model.eval()
    heads.eval()
    if mixed:
        return _evaluate_mixed(encoder, heads, adaptation, data, batch_size, progress, shard)
    preds: dict[str, list[float]] = {}
    for t, d in data.items():
        if adaptation is not None:
            adaptation.use(t)
        order = sorted(range(len(d.dev)), key=lambda i: len(d.dev[i].a) + len(d.dev[i].b or ""))
        chunks = [order[j:j + batch_size] for j in range(0, len(order), batch_size)][shard[0]::shard[1]]
        bar = progress.add_task(f"dev {t}", total=len(chunks)) if progress is not None else None
        out: list = [None] * len(d.dev)
        for idx in chunks:
            for i, p in zip(idx, predictions(d.dataset.kind, heads[t](encoder([d.dev[i] for i in idx])))):
                out[i] = p
            if bar is not None:
                progress.advance(bar)
        preds[t] = out
    return preds


def _evaluate_mixed(encoder: Encoder, heads: nn.ModuleDict, adaptation: Any, data: dict, batch_size: int,
                    progress: Any, shard: tuple[int, int]) -> dict[str, list[float]]:
    pairs = [(t, i) for t, d in data.items() for i in range(len(d.dev))]
    size = lambda p: len(data[p[0]].dev[p[1]].a) + len(data[p[0]].dev[p[1]].b or "")  # noqa: E731
    order = sorted(pairs, key=size)
    chunks = [order[j:j + batch_size] for j in range(0, len(order), batch_size)][shard[0]::shard[1]]
    bar = progress.add_task("dev (mixed batches)", total=len(chunks)) if progress is not None else None
    preds: dict[str, list] = {t: [None] * len(d.dev) for t, d in data.items()}
    rank = {t: k for k, t in enumerate(data)}
    for chunk in chunks:
        chunk = sorted(chunk, key=lambda p: rank[p[0]])
        with routed(adaptation, [t for t, _ in chunk]):
            pooled = encoder([data[t].dev[i] for t, i in chunk])
        for t in dict.fromkeys(t for t, _ in chunk):
            rows = [k for k, (name, _) in enumerate(chunk) if name == t]
            for k, p in zip(rows, predictions(data[t].dataset.kind, heads[t](pooled[rows]))):
                preds[t][chunk[k][1]] = p
        if bar is not None:
            progress.advance(bar)
    return preds
