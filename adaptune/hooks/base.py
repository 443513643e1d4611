"""What every hook shares: entries (group, point, bound module) and the active filter."""
from __future__ import annotations

from typing import Any

from torch import nn


class Hook:
    """Routes one place of the model through the components bound there.

    `group` is None for shared components and the task name for per-task ones; an entry runs when
    its group is active and it is not merged into the base weights.
    """

    def __init__(self, adaptation: Any, point: Any) -> None:
        self.adaptation = adaptation
        self.point = point
        self.entries: list[tuple[str | None, Any, nn.Module]] = []

    def add(self, group: str | None, point: Any, bound: nn.Module) -> None:
        self.entries.append((group, point, bound))

    def active(self) -> list[tuple[Any, nn.Module]]:
        is_active = self.adaptation.is_active
        return [(p, b) for g, p, b in self.entries if is_active(g) and not getattr(b, "merged", False)]

    def install(self) -> None:
        raise NotImplementedError

    def remove(self) -> None:
        raise NotImplementedError
