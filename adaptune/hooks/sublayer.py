"""Applies the active adapters to a sublayer's output (before residual and norm).

A forward hook on the output module rewrites its output; parallel adapters also need the sublayer
input, captured by a pre-hook on the input module for the duration of one forward.
"""
from __future__ import annotations

from typing import Any

from .base import Hook


class SublayerHook(Hook):
    def install(self) -> None:
        self._x = None
        self._handles = [self.point.module.register_forward_hook(self._after)]
        if any(getattr(b.module, "parallel", False) for b in self.bindings):
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
        for b in active:
            h = b.module(h, x)
        return (h, *output[1:]) if isinstance(output, tuple) else h
