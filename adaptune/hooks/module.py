"""Routes a base module through the trainable copy of the active group (Trainable, components/trainable.py).

The module's `forward` is replaced on the instance (its weights and state-dict keys untouched), as the
projection hook does; `remove()` puts the original back. With no copy active the original runs.
"""
from __future__ import annotations

from torch import Tensor

from ..errors import AdaptuneError, BindError
from .base import Binding, ForwardHook, together


class ModuleHook(ForwardHook):
    def add(self, binding: Binding) -> None:
        for other in self.bindings:
            if together(other, binding):
                where = "shared" if binding.group is None else f"task {binding.group!r}"
                raise BindError(f"{binding.point.site!r} is trained twice in {where}: a module takes one Trainable "
                                f"among the shared and each task's components")
        super().add(binding)

    def install(self) -> None:
        module = self.point.module
        inside = {id(m) for m in module.modules()}
        for hook in self.adaptation.hooks.values():
            places = (hook.point.module, hook.point.in_module)
            if hook is not self and any(id(m) in inside for m in places if m is not None):
                raise BindError(f"Trainable on {self.point.site!r} trains a copy of it, but {hook.point.where()} "
                                f"(inside it) also has components, which the copy would bypass; train the module "
                                f"as a whole or adapt its parts, not both")
        super().install()

    def forward(self, *args, **kwargs):
        active = self.active()
        route = self.adaptation.routing
        if route is None or not active or active[0].group is None:
            return active[0].module(*args, **kwargs) if active else self._base(*args, **kwargs)
        return self._routed(route, active, args, kwargs)

    def _routed(self, route, active: list[Binding], args: tuple, kwargs: dict):
        """Inside route(): each sample through its task's copy (shared-only samples and tasks without one:
        the original), the module run once per group on its samples' rows."""
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), None)
        if first is None or first.dim() == 0:
            raise AdaptuneError(f"{self.point.site!r}: routing samples to per-task copies needs a batched tensor "
                                f"argument (batch first)")
        n, where = first.shape[0], self.point.where()
        run = {b.group: b.module for b in active}
        rows = route.rows_for(n, first.device, where)
        take = lambda a, r: a.index_select(0, r) if isinstance(a, Tensor) and a.dim() and a.shape[0] == n else a  # noqa: E731
        out = None
        for i, r in rows.items():
            module = run.get(route.group(i), self._base)
            y = module(*(take(a, r) for a in args), **{k: take(v, r) for k, v in kwargs.items()})
            parts = y if isinstance(y, tuple) else (y,)
            if not all(isinstance(p, Tensor) for p in parts):
                raise AdaptuneError(f"{self.point.site!r}: routing samples to per-task copies needs outputs that "
                                    f"are tensors or tuples of tensors, got {type(y).__name__}")
            if out is None:
                out = [p.new_zeros((n, *p.shape[1:])) for p in parts]
            out = [o.index_copy(0, r, p.to(o.dtype)) for o, p in zip(out, parts)]
        return tuple(out) if isinstance(y, tuple) else out[0]
