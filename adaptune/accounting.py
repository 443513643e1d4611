"""Parameter accounting: the columns of AdaptBERT's Tables 2-3 (% updated per task, % stored).

Below the adaptation: it reads only what an adaptation exposes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from .quantized import parameter_count


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass(frozen=True)
class Counts:
    base: int  # parameters of the model itself (everything outside the adaptation; a quantized weight as in float)
    shared: int  # component parameters used by every task
    per_task: dict[str, int]  # task-specific component parameters

    def trainable(self, task: str | None = None) -> int:
        """Parameters updated when training `task`: shared plus that task's own."""
        return self.shared + (self.per_task[task] if task is not None else 0)

    def pct_trainable(self, task: str | None = None) -> float:
        return 100.0 * self.trainable(task) / self.base

    @property
    def stored(self) -> int:
        """Extra parameters stored for all tasks together (shared once, plus every task's own)."""
        return self.shared + sum(self.per_task.values())

    @property
    def pct_stored(self) -> float:
        return 100.0 * self.stored / self.base

    def rows(self) -> list[tuple[str, int, float, int]]:
        """(task, trainable, % of base, task-specific stored) per task, or one 'shared' row."""
        tasks = list(self.per_task) or [None]
        return [(t or "(shared)", self.trainable(t), self.pct_trainable(t), self.per_task.get(t, 0) if t else 0)
                for t in tasks]


def count(adaptation: Any) -> Counts:
    """The counts of an adaptation (anything with model, parameters(), shared, tasks and task_names);
    `adaptune.counts(model)` and `Adaptation.counts()` call it."""
    base = parameter_count(adaptation.model, {id(p) for p in adaptation.parameters()})  # quantized: as in float
    return Counts(base=base, shared=_count(adaptation.shared),
                  per_task={name: _count(adaptation.tasks[name]) for name in adaptation.task_names})
