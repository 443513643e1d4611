"""Seed 003's transfer recipes: LM-BFF's few-shot protocol, self-ensemble and self-distillation.

  few_shot            k training examples per class and a disjoint dev set of k per class (Gao et al. 2021,
                      LM-BFF), one random.Random(seed) stream, classes visited in the order 0..n_classes-1
  ParameterAverage    self-ensemble (Xu et al. 2020): θ̄ = (1/T)·Σ_{t=1..T} θ_t over the last T snapshots of
                      the trainable parameters, one snapshot every `every` optimizer steps
  distillation_loss   self-distillation (Xu et al. 2020): L = CE(z, y) + λ·MSE(z, z̄), z̄ the self-ensemble's
                      logits, detached (the teacher gets no gradient)
"""
from __future__ import annotations

import math
import random
from collections import deque
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import ConfigError
from ..common.data import Example
from ..common.errors import DataError, TrainingError


def _positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be an integer >= 1, got {value!r}")
    return value


def _class_indices(examples: Sequence[Example], n_classes: int) -> list[list[int]]:
    """by[c] = the indices (file order) of the examples whose label is class id c; DataError for any other label."""
    by: list[list[int]] = [[] for _ in range(n_classes)]
    for i, e in enumerate(examples):
        y = e.label
        if not (isinstance(y, (int, float)) and math.isfinite(y) and y == int(y) and 0 <= y < n_classes):
            raise DataError(f"example {i} (line {e.line}): label {y!r} is not a class id in 0..{n_classes - 1}")
        by[int(y)].append(i)
    return by


def few_shot(examples: Sequence[Example], k: int, seed: int, n_classes: int) -> tuple[list[Example], list[Example]]:
    """LM-BFF's protocol: k training examples per class and a dev set of the same size (k per class, disjoint
    from the training ones), sampled from `examples` with random.Random(seed); both returned in file order
    (the order of `examples`). DataError when a class has fewer than 2k examples (name the class, its count, k);
    ConfigError for k < 1 or a non-integer k. Labels are class ids stored as floats (Example.label).

    One stream rng = random.Random(seed); for c = 0..n_classes-1: rng.shuffle(I_c), I_c the indices of class c
    in file order; train gets I_c[:k], dev I_c[k:2k]. So the sets depend on the seed and on each class's own
    order, not on how the classes interleave in the file."""
    k = _positive_int(k, "k (few-shot examples per class)")
    n_classes = _positive_int(n_classes, "n_classes")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"the few-shot seed must be an integer, got {seed!r}")
    by = _class_indices(examples, n_classes)
    short = [(c, len(ix)) for c, ix in enumerate(by) if len(ix) < 2 * k]
    if short:
        c, n = short[0]
        raise DataError(f"class {c} has {n} examples; few-shot k={k} needs at least 2k={2 * k} per class "
                        f"(k train + k dev). Counts per class: {[len(ix) for ix in by]}")
    rng, train, dev = random.Random(seed), [], []
    for ix in by:
        ix = list(ix)
        rng.shuffle(ix)
        train += ix[:k]
        dev += ix[k:2 * k]
    return [examples[i] for i in sorted(train)], [examples[i] for i in sorted(dev)]


class ParameterAverage:
    """Self-ensemble: the average of the trainable parameters over the last `window` snapshots, one snapshot every
    `every` optimizer steps (the last T steps: every=1; the last T checkpoints: every=steps between checkpoints).
    Cheap for PEFT: only the given parameters (the components and heads) are copied.

    θ̄_j = (1/n)·Σ_{s in held} θ_j^(s), n = count <= window, summed in at least float32 (float64 stays float64)
    straight from the held snapshots (exact: no running sum to drift), then cast to θ_j's dtype."""

    def __init__(self, params: Sequence[torch.nn.Parameter], window: int, every: int = 1) -> None:
        self.params = list(params)
        if not self.params:
            raise ConfigError("ParameterAverage needs at least one parameter (the trainable components and heads)")
        bad = [i for i, p in enumerate(self.params) if not isinstance(p, Tensor)]
        if bad:
            raise ConfigError(f"ParameterAverage takes tensors (nn.Parameter); items {bad} are not")
        self.window = _positive_int(window, "the self-ensemble window")
        self.every = _positive_int(every, "the self-ensemble snapshot interval `every` (optimizer steps)")
        self.steps = 0  # step() calls so far
        self.snapshots: deque[list[Tensor]] = deque(maxlen=self.window)

    @property
    def count(self) -> int:
        """Snapshots held (<= window)."""
        return len(self.snapshots)

    def step(self) -> None:
        """Call after each optimizer step; on every `every`-th call, snapshot (detached clones, same device)."""
        self.steps += 1
        if self.steps % self.every:
            return
        snap = [p.detach().clone() for p in self.params]
        bad = [i for i, s in enumerate(snap) if not bool(torch.isfinite(s).all())]
        if bad:
            raise TrainingError(f"self-ensemble snapshot at step {self.steps}: parameters {bad} are not finite; "
                                f"an average over them would be too (stop or lower the learning rate)")
        self.snapshots.append(snap)

    def average(self) -> list[Tensor]:
        """The elementwise mean of the held snapshots, one tensor per parameter (its dtype and device)."""
        if not self.snapshots:
            raise TrainingError(f"no self-ensemble snapshot yet after {self.steps} steps (one every {self.every} "
                                f"steps); call step() after optimizer steps before average() or swapped()")
        out = []
        for j, p in enumerate(self.params):
            acc = torch.zeros(p.shape, dtype=torch.promote_types(p.dtype, torch.float32), device=p.device)
            for snap in self.snapshots:
                acc += snap[j]
            out.append((acc / len(self.snapshots)).to(p.dtype))
        return out

    @contextmanager
    def swapped(self) -> Iterator[list[Tensor]]:
        """Inside: the parameters hold the average (copied in place under no_grad; .grad untouched); on exit,
        even on an error, they hold their exact values from before. Yields the average."""
        mean = self.average()
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, m in zip(self.params, mean):
                p.copy_(m)
        try:
            yield mean
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)


def _check_weight(weight: object) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise ConfigError(f"the distillation weight must be a finite number >= 0, got {weight!r}")
    return float(weight)


def _check_shapes(logits: Tensor, labels: Tensor, teacher_logits: Tensor) -> None:
    if logits.dim() != 2 or tuple(teacher_logits.shape) != tuple(logits.shape):
        raise ConfigError(f"logits and teacher_logits must both be (batch, classes) of the same shape; got "
                          f"logits {tuple(logits.shape)}, teacher_logits {tuple(teacher_logits.shape)}")
    if tuple(labels.shape) != (logits.shape[0],):
        raise ConfigError(f"labels must be (batch,) = ({logits.shape[0]},) class ids for logits "
                          f"{tuple(logits.shape)}; got labels {tuple(labels.shape)}")


def _class_ids(labels: Tensor, n_classes: int) -> Tensor:
    """labels (float or integer class ids) as a long tensor; DataError for a non-integer or out-of-range one."""
    if labels.is_floating_point():
        if not bool((torch.isfinite(labels) & (labels == labels.round())).all()):
            raise DataError(f"labels must be whole class ids in 0..{n_classes - 1}; got {labels.tolist()[:8]}")
    ids = labels.long()
    if ids.numel() and not bool(((ids >= 0) & (ids < n_classes)).all()):
        raise DataError(f"labels must be class ids in 0..{n_classes - 1}; got {ids.tolist()[:8]}")
    return ids


def distillation_loss(logits: Tensor, labels: Tensor, teacher_logits: Tensor, weight: float) -> tuple[Tensor, dict]:
    """Self-distillation (Xu et al. 2020): CE(logits, labels) + weight * MSE(logits, teacher_logits), the teacher
    (the self-ensemble's logits) detached. Returns (loss, {"ce": float, "mse": float}).

    CE = -(1/N)·Σ_n log softmax(z_n)[y_n]; MSE = (1/(N·C))·Σ_{n,c} (z_nc − z̄_nc)²; weight 0 gives CE itself."""
    weight = _check_weight(weight)
    _check_shapes(logits, labels, teacher_logits)
    ce = F.cross_entropy(logits, _class_ids(labels, logits.shape[1]))
    mse = F.mse_loss(logits, teacher_logits.detach().to(logits.dtype))
    loss = ce + weight * mse if weight else ce
    return loss, {"ce": float(ce.detach()), "mse": float(mse.detach())}
