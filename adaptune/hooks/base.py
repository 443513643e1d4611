"""What every hook shares: its bindings, the active filter, and the merge protocol."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import MergeError
from ..points import Point


@dataclass(frozen=True, eq=False)
class Binding:
    """One component module bound at one point, for the shared set (`group` None) or one task."""
    group: str | None
    point: Point
    module: nn.Module


class Hook:
    """Routes one place of the model through the components bound there.

    A binding runs when its group is active and it is not merged into the base weights. Hooks whose
    components fold into base weights (projections) override the merge methods and keep the backups
    that unmerge restores; the others merge nothing and keep running.
    """

    def __init__(self, adaptation: Any, point: Point) -> None:
        self.adaptation = adaptation
        self.point = point
        self.bindings: list[Binding] = []
        self._backups: dict[Binding, Any] = {}  # merged binding -> the base weights it replaced

    def add(self, binding: Binding) -> None:
        self.bindings.append(binding)

    def active(self) -> list[Binding]:
        is_active = self.adaptation.is_active
        return [b for b in self.bindings if is_active(b.group) and b not in self._backups]

    def install(self) -> None:
        raise NotImplementedError

    def remove(self) -> None:
        raise NotImplementedError

    # ---- merging --------------------------------------------------------------------------------

    @property
    def merged(self) -> bool:
        return bool(self._backups)

    def mergeable(self) -> list[Binding]:
        """The active bindings merge() would fold in, each checked; changes nothing (raises MergeError)."""
        return []

    def merge(self, bindings: list[Binding]) -> dict[str, tuple[float, float]]:
        """Fold `bindings` (from mergeable()) into the base weights, keeping backups; returns the error that
        requantizing a quantized weight introduced, per point: (max |ΔW|, ‖ΔW‖ / ‖W‖)."""
        return {}

    def unmerge(self) -> None:
        """Restore the base weights from the backups, bit-exact."""

    def _check_not_training_merged(self) -> None:
        if self._backups and self.point.module.training and torch.is_grad_enabled() and any(
                p.requires_grad for b in self._backups for p in b.module.parameters()):
            raise MergeError(f"cannot train {self.point.where()} while its updates are merged into the base weights: "
                             f"merged components get no gradient; call unmerge() before training (or eval() / "
                             f"torch.no_grad() to run merged)")


def together(a: Binding, b: Binding) -> bool:
    """Whether two bindings can run in the same forward: either is shared, or both belong to one task."""
    return a.group is None or b.group is None or a.group == b.group


class ForwardHook(Hook):
    """A hook that replaces its module's `forward` on the instance (weights and state-dict keys
    untouched); `remove()` puts the original back and `_base` runs it."""

    def install(self) -> None:
        module = self.point.module
        self._previous = module.__dict__.get("forward")
        module.forward = self.forward

    def remove(self) -> None:
        module = self.point.module
        if self._previous is None:
            del module.forward
        else:
            module.forward = self._previous

    def _base(self, *args, **kwargs):
        module = self.point.module
        return (self._previous or type(module).forward.__get__(module))(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError
