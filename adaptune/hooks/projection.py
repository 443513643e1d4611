"""Routes a Linear / Conv1D through its active low-rank update (LoRA or DoRA), slice by slice.

The module's `forward` is replaced on the instance (base weights and state-dict keys untouched);
`remove()` puts the original back.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import BindError, MergeError
from ..points import linear_weight
from .base import Binding, Hook


class ProjectionHook(Hook):
    def add(self, binding: Binding) -> None:
        new = binding.point.out_rows
        for other in self.bindings:
            old = other.point.out_rows
            overlap = old.start < new.stop and new.start < old.stop
            if overlap and (other.group is None or binding.group is None or other.group == binding.group):
                where = "shared" if binding.group is None else f"task {binding.group!r}"
                raise BindError(f"two low-rank updates on the same weights of {binding.point.where()} in {where}: "
                                f"{type(other.module).__name__} and {type(binding.module).__name__}; a projection "
                                f"takes at most one LoRA or DoRA among the shared and each task's components")
        super().add(binding)

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
        if self._backups and self.point.module.training and torch.is_grad_enabled() and any(
                p.requires_grad for b in self._backups for p in b.module.parameters()):
            raise MergeError(f"cannot train {self.point.where()} while its updates are merged into the base weights: "
                             f"merged components get no gradient; call unmerge() before training (or eval() / "
                             f"torch.no_grad() to run merged)")
        active = self.active()
        if not active:
            return self._base(x, *args, **kwargs)
        module = self.point.module
        weight, bias = linear_weight(module), module.bias  # (out, in), (out,)
        if len(active) == 1 and active[0].point.rows is None:
            return active[0].module.linear(x, weight, bias)
        parts, pos = [], 0  # fused projection: adapted slices through their op, the rest plain
        for b in sorted(active, key=lambda b: b.point.out_rows.start):
            rows = b.point.out_rows
            if rows.start > pos:
                parts.append(F.linear(x, weight[pos:rows.start], None if bias is None else bias[pos:rows.start]))
            parts.append(b.module.linear(x, weight[rows], None if bias is None else bias[rows]))
            pos = rows.stop
        if pos < weight.shape[0]:
            parts.append(F.linear(x, weight[pos:], None if bias is None else bias[pos:]))
        return torch.cat(parts, dim=-1)

    # ---- merge / unmerge: W[rows] <- the update's merged weight; the replaced rows kept here -------

    def mergeable(self) -> list[Binding]:
        module = self.point.module
        weight = linear_weight(module)
        out = []
        for b in self.active():
            what = f"{type(b.module).__name__} at {b.point.where()}"
            tied = [n for n, m in self.adaptation.model.named_modules() if m is not module
                    and any(p is module.weight for p in m.parameters(recurse=False))]
            if tied:
                raise MergeError(f"cannot merge {what}: its weight is tied to {', '.join(tied)}, which merging "
                                 f"would change too; nothing was merged")
            with torch.no_grad():
                merged = b.module.merged_weight(weight[b.point.out_rows]).to(weight.dtype)  # as merge() writes it
                if not torch.isfinite(merged).all():
                    raise MergeError(f"merging {what} gives non-finite weights in {weight.dtype} (NaN or inf in its "
                                     f"parameters, or values beyond the dtype's range); nothing was merged")
            out.append(b)
        return out

    @torch.no_grad()
    def merge(self, bindings: list[Binding]) -> None:
        weight = linear_weight(self.point.module)
        for b in bindings:
            view = weight[b.point.out_rows]
            self._backups[b] = view.clone()
            view.copy_(b.module.merged_weight(view).to(view.dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        weight = linear_weight(self.point.module)
        for b, backup in self._backups.items():
            weight[b.point.out_rows].copy_(backup)
        self._backups.clear()
