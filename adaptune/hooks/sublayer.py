"""Applies the active adapters (SublayerModules, components/contract.py) to a sublayer's output (before
residual and norm).

A forward hook on the output module rewrites its output; parallel adapters also need the sublayer
input, captured by a pre-hook on the input module for the duration of one forward.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor

from ..components.contract import Context
from .base import Binding, Hook
from .route import per_rows


class SublayerHook(Hook):
    def install(self) -> None:
        self._x = None
        self._handles = [self.point.module.register_forward_hook(self._after)]
        if any(b.module.parallel for b in self.bindings):
            self._handles.append(self.point.in_module.register_forward_pre_hook(self._before))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._x = [], None

    def _before(self, module, args) -> None:
        self._x = args[0] if args else None

    def _after(self, module, args, output) -> Any:
        active, x = self.active(), self._x
        self._x = None
        if not active:
            return None
        h = output[0] if isinstance(output, tuple) else output
        context = self.adaptation.context
        route = context.route
        for run in _runs(active) if route is not None else ([b] for b in active):
            if route is None or run[0].group is None:
                h = run[0].module(h, x, context)  # shared: every sample (a hypernetwork reads the route itself)
            else:
                h = self._routed(run, h, x, context)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    def _routed(self, run: list[Binding], h: Tensor, x: Tensor | None, context: Context) -> Tensor:
        """h with each sample through its task's module in `run` (one per task), batched when the modules
        have a routed form of one type, else task by task on the task's rows."""
        groups, modules, where, route = [b.group for b in run], [b.module for b in run], self.point.where(), context.route
        kind = type(modules[0])
        if kind.routed is not None and all(type(m) is kind for m in modules):
            return kind.routed(modules, h, x, route.local(groups, h.shape[0], h.device, where))
        take = lambda t, rows: None if t is None else t.index_select(0, rows)  # noqa: E731
        return per_rows(route, groups, h.shape[0], h.device, where,
                        lambda i, rows: modules[i](take(h, rows), take(x, rows), context), h)


def _runs(active: list[Binding]) -> list[list[Binding]]:
    """The bindings in order, consecutive per-task ones of distinct tasks together (they touch disjoint
    samples, so they commute); a shared binding alone."""
    runs: list[list[Binding]] = []
    for b in active:
        last = runs[-1] if runs else None
        if b.group is not None and last and last[0].group is not None and all(o.group != b.group for o in last):
            last.append(b)
        else:
            runs.append([b])
    return runs
