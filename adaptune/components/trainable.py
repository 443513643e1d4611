"""Trainable (PEFT's modules_to_save): a whole module of the base trained as is.

Trainable() on a module path ("classifier", "score", "lm_head", any module type) routes that module's
forward through a trainable copy owned by the adaptation, as PEFT's ModulesToSaveWrapper does: the
original is never changed, so detach() restores it bit-exact, and every task can have its own copy
(per-task heads) while the shared set or no task runs the original. The copy's parameters (and
buffers) are the adaptation's, so save / load carry them. It merges nothing: merge() leaves it running.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import Tensor, nn

from ..points import MODULE, Point
from .base import Component


@dataclass(frozen=True)
class Trainable(Component):
    """Train a module of the base model as a whole (a classification head): a copy of it, per group."""

    kind = MODULE

    def bind(self, point: Point, shared=None) -> "ModuleCopy":
        return ModuleCopy(point.module)


class ModuleCopy(nn.Module):
    """The trainable copy of one base module; called in its place with the same arguments."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        module = copy.deepcopy(original)
        module.__dict__.pop("forward", None)  # a forward replaced on the instance is not the module's own
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
        for p in module.parameters():
            p.requires_grad_(True)
        self.module = module

    def forward(self, *args, **kwargs):
        """The copy's output; floating inputs cast to the copy's dtype and the output back to theirs (the
        copy is float32 on a half-precision base, as every component)."""
        ref = next(self.module.parameters(), None)
        if ref is None:
            return self.module(*args, **kwargs)
        dtypes = [a.dtype for a in (*args, *kwargs.values()) if isinstance(a, Tensor) and a.is_floating_point()]
        if not dtypes or dtypes[0] == ref.dtype:
            return self.module(*args, **kwargs)
        cast = lambda a, t: a.to(t) if isinstance(a, Tensor) and a.is_floating_point() else a  # noqa: E731
        out = self.module(*(cast(a, ref.dtype) for a in args), **{k: cast(v, ref.dtype) for k, v in kwargs.items()})
        if isinstance(out, tuple):
            return tuple(cast(o, dtypes[0]) for o in out)
        return cast(out, dtypes[0])
