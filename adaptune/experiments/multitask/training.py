"""The pieces of one multitask training run: pooled encoding, losses, the round-robin batch order,
the learning-rate schedule, and evaluation.

Pooling: the mean of the last hidden states over real tokens (attention mask 1). With prompt
tuning the model's outputs carry the soft-prompt positions in front; they are dropped, so the mean
is over the input's own tokens only. Sentence pairs are cross-encoded: tokenizer(s1, s2).
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .datasets import BINARY, CLASSES

EVAL_BATCH = 64  # dev batches (no gradients): larger than training batches


def takes_logits_to_keep(model: nn.Module) -> bool:
    """Causal LMs of transformers >= 4.50 (GPT-2, Llama) take `logits_to_keep`, also as a 1-D tensor of positions:
    only those rows are projected to the vocabulary."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


class Encoder:
    """Tokenize, run the (adapted) model, mean-pool over real tokens: (B, d)."""

    def __init__(self, model: nn.Module, tok: Any, max_length: int, device: torch.device | str = "cpu") -> None:
        self.model, self.tok, self.max_length, self.device = model, tok, max_length, torch.device(device)
        self.lm = getattr(model, "lm_head", None) is not None  # an LM-head model: read hidden_states
        # pooling reads no logits: project one row, not (B, T, V) (1.6 GB for 64 x 128 tokens of a 49k vocabulary)
        self.keep = {"logits_to_keep": 1} if self.lm and takes_logits_to_keep(model) else {}
        self.types = getattr(model.config, "type_vocab_size", 0) > 0

    def tokenize(self, examples: list) -> dict[str, torch.Tensor]:
        a = [e.a for e in examples]
        pairs = [e.b is not None for e in examples]
        if any(pairs) and not all(pairs):  # a mixed batch of sentences and pairs: each encoded, then padded
            each = [self.tok(e.a, e.b, truncation=True, max_length=self.max_length) for e in examples]
            return self.tok.pad(each, padding=True, return_tensors="pt")
        b = [e.b for e in examples] if pairs[0] else None
        return self.tok(a, b, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")

    def __call__(self, examples: list) -> torch.Tensor:
        batch = self.tokenize(examples)
        kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if self.types and "token_type_ids" in batch:
            kw["token_type_ids"] = batch["token_type_ids"]
        kw = {k: v.to(self.device) for k, v in kw.items()}
        out = self.model(**kw, **self.keep, output_hidden_states=True) if self.lm else self.model(**kw)
        hidden = out.hidden_states[-1] if self.lm else out.last_hidden_state  # (B, P+T, d)
        mask = kw["attention_mask"]  # (B, T)
        hidden = hidden[:, -mask.shape[1]:]  # drop soft-prompt positions in front, if any
        m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)  # (B, d)


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


def warmup_linear(optimizer: torch.optim.Optimizer, total: int, warmup: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over the first `warmup` share of the steps, then linear decay to 0."""
    n_warm = max(1, round(total * warmup))

    def factor(step: int) -> float:
        if step < n_warm:
            return (step + 1) / n_warm
        return max(0.0, (total - step) / max(1, total - n_warm))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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
