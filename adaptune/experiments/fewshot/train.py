"""One seed of a few-shot run: class scores for a batch (prompt or head), the training loop with model selection on
the few-shot dev set, the self-ensemble and self-distillation recipes, and test accuracy.

Training: AdamW, linear warm-up (10% of the steps) then linear decay, gradients clipped to norm 1, batches drawn
from the K-shot set reshuffled every pass (seeded). Every `eval_every` steps (and after the last) the few-shot dev
accuracy is measured and the trainable parameters of the best step kept (LM-BFF's selection; ties go to the later
step); they are the model tested. The self-ensemble is the average of the last T snapshots, tested as its own model;
with self-distillation its logits (in eval mode, no gradients) are the teacher of every step once a snapshot exists.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..common.data import Example
from ..common.errors import TrainingError
from ..common.training import EVAL_BATCH, Encoder, warmup_linear
from .prompts import Prompt
from .recipes import ParameterAverage, distillation_loss

Score = Callable[[Sequence[Example]], Tensor]  # examples -> class logits (B, C)


def scorer(model: nn.Module, prompt: Prompt | None, head: nn.Module | None, encoder: Encoder,
           max_length: int, device: torch.device) -> Score:
    """The class logits of a batch: the label words' logits at the answer position (prompt), else the head on the
    mean-pooled hidden states."""
    if prompt is not None:
        def by_prompt(examples: Sequence[Example]) -> Tensor:
            batch = {k: v.to(device) for k, v in prompt.encode(list(examples), max_length).items()}
            return prompt.class_logits(model, batch)
        return by_prompt
    assert head is not None
    return lambda examples: head(encoder(list(examples)))


@contextmanager
def evaluating(modules: Sequence[nn.Module]) -> Iterator[None]:
    """The modules in eval mode inside; their own modes restored on exit, even on an error."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


@torch.no_grad()
def predict(score: Score, modules: Sequence[nn.Module], examples: Sequence[Example],
            batch_size: int = EVAL_BATCH, on_batch: Callable[[], None] | None = None) -> list[int]:
    """Predicted class ids in the order of `examples`, batched by length (eval mode, restored after)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].a) + len(examples[i].b or ""))
    out = [0] * len(examples)
    with evaluating(modules):
        for j in range(0, len(order), batch_size):
            idx = order[j:j + batch_size]
            logits = score([examples[i] for i in idx]).float()
            if not torch.isfinite(logits).all():
                raise TrainingError("the class logits are not finite; nothing is saved (try a lower --lr)")
            for i, p in zip(idx, logits.argmax(-1).tolist()):
                out[i] = p
            if on_batch is not None:
                on_batch()
    return out


def accuracy(preds: Sequence[int], examples: Sequence[Example]) -> float:
    return sum(int(p == int(e.label)) for p, e in zip(preds, examples)) / len(examples)


def train_seed(score: Score, modules: Sequence[nn.Module], groups: list[dict], train: Sequence[Example],
               dev: Sequence[Example], *, steps: int, batch_size: int, eval_every: int, seed: int,
               ensemble: ParameterAverage | None = None, distill: float | None = None,
               on_step: Callable[[dict], None] | None = None) -> dict:
    """Train in place; returns the history and the selection. The best dev step's parameters are loaded at the end."""
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups)
    sched = warmup_linear(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    queue: list[int] = []
    labels_of = lambda batch: torch.tensor([int(e.label) for e in batch])  # noqa: E731
    best: dict[str, Any] = {"dev": -1.0, "step": 0, "state": None}
    history = []
    for m in modules:
        m.train()
    for step in range(1, steps + 1):
        if len(queue) < batch_size:
            queue += torch.randperm(len(train), generator=gen).tolist()
        batch = [train[i] for i in queue[:batch_size]]
        del queue[:batch_size]
        teacher = None  # first: the teacher's forward swaps the parameters in place
        if distill is not None and ensemble is not None and ensemble.count:
            teacher = _teacher(score, modules, ensemble, batch)
        logits = score(batch).float()
        labels = labels_of(batch).to(logits.device)
        row: dict[str, Any] = {"step": step}
        if teacher is not None:
            loss, parts = distillation_loss(logits, labels, teacher, distill)
            row.update(parts)
        else:
            loss = F.cross_entropy(logits, labels)
        row["loss"] = _finite(loss.item(), "the loss", step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        _finite(torch.nn.utils.clip_grad_norm_(params, 1.0).item(), "the gradient norm", step)
        opt.step()
        sched.step()
        if ensemble is not None:
            ensemble.step()
        if (eval_every and step % eval_every == 0) or step == steps:
            row["dev"] = accuracy(predict(score, modules, dev), dev)
            if row["dev"] >= best["dev"]:
                best = {"dev": row["dev"], "step": step, "state": [p.detach().clone() for p in params]}
        history.append(row)
        if on_step is not None:
            on_step(row)
    if eval_every and best["state"] is not None:
        with torch.no_grad():
            for p, saved in zip(params, best["state"]):
                p.copy_(saved)
    return {"history": history, "best_dev": best["dev"], "best_step": best["step"] if eval_every else steps}


def _teacher(score: Score, modules: Sequence[nn.Module], ensemble: ParameterAverage, batch: list) -> Tensor:
    with evaluating(modules), torch.no_grad(), ensemble.swapped():
        return score(batch).float()


def _finite(value: float, what: str, step: int) -> float:
    if not math.isfinite(value):
        raise TrainingError(f"training diverged at step {step}: {what} is {value}; nothing is saved "
                            f"(try a lower --lr)")
    return value
