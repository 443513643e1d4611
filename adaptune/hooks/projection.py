"""Routes a Linear / Conv1D through its active low-rank update (LoRA or DoRA), slice by slice.

The module's `forward` is replaced on the instance (base weights and state-dict keys untouched);
`remove()` puts the original back.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import BindError, MergeError
from ..sites import linear_weight
from .base import Hook


def _rows(point) -> slice:
    return point.rows if point.rows is not None else slice(0, point.out_features)


class ProjectionHook(Hook):
    def add(self, group, point, bound) -> None:
        new = _rows(point)
        for g, p, b in self.entries:
            old = _rows(p)
            overlap = old.start < new.stop and new.start < old.stop
            if overlap and (g is None or group is None or g == group):
                where = "shared" if group is None else f"task {group!r}"
                raise BindError(f"two low-rank updates on the same weights of {point.site} (layer {point.layer}) "
                                f"in {where}: {type(b).__name__} and {type(bound).__name__}; a projection takes "
                                f"at most one LoRA or DoRA among the shared and each task's components")
        super().add(group, point, bound)

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

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        active = self.active()
        if not active:
            return self._base(x, *args, **kwargs)
        module = self.point.module
        weight, bias = linear_weight(module), module.bias  # (out, in), (out,)
        if len(active) == 1 and active[0][0].rows is None:
            return active[0][1].linear(x, weight, bias)
        parts, pos = [], 0  # fused projection: adapted slices through their op, the rest plain
        for point, bound in sorted(active, key=lambda pb: _rows(pb[0]).start):
            rows = _rows(point)
            if rows.start > pos:
                parts.append(F.linear(x, weight[pos:rows.start], None if bias is None else bias[pos:rows.start]))
            parts.append(bound.linear(x, weight[rows], None if bias is None else bias[rows]))
            pos = rows.stop
        if pos < weight.shape[0]:
            parts.append(F.linear(x, weight[pos:], None if bias is None else bias[pos:]))
        return torch.cat(parts, dim=-1)

    # ---- merge / unmerge ----------------------------------------------------------------------

    def to_merge(self) -> list[tuple[Tensor, object]]:
        """(weight rows view, bound) for every active update; checks merged values are finite."""
        out = []
        weight = linear_weight(self.point.module)
        for point, bound in self.active():
            view = weight[_rows(point)]
            where = f"{point.site} (layer {point.layer})"
            tied = [n for n, m in self.adaptation.model.named_modules() if m is not self.point.module
                    and any(p is self.point.module.weight for p in m.parameters(recurse=False))]
            if tied:
                raise MergeError(f"cannot merge {type(bound).__name__} at {where}: its weight is tied to "
                                 f"{', '.join(tied)}, which merging would change too; nothing was merged")
            with torch.no_grad():
                if not torch.isfinite(bound.merged_weight(view)).all():
                    raise MergeError(f"merging {type(bound).__name__} at {where} gives non-finite weights "
                                     f"(NaN or inf in its parameters); nothing was merged")
            out.append((view, bound))
        return out

    def unmerge(self) -> None:
        weight = linear_weight(self.point.module)
        for _, point, bound in self.entries:
            if bound.merged:
                weight[_rows(point)].copy_(bound._backup)
                bound._backup, bound.merged = None, False
