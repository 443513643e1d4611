"""Routes a base module through the trainable copy of the active group (Trainable, components/trainable.py).

The module's `forward` is replaced on the instance (its weights and state-dict keys untouched), as the
projection hook does; `remove()` puts the original back. With no copy active the original runs.
"""
from __future__ import annotations

from ..errors import BindError
from .base import Binding, ForwardHook


class ModuleHook(ForwardHook):
    def add(self, binding: Binding) -> None:
        for other in self.bindings:
            if other.group is None or binding.group is None or other.group == binding.group:
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
        return active[0].module(*args, **kwargs) if active else self._base(*args, **kwargs)
