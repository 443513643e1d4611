"""Routes a Linear / Conv1D through its active low-rank update (LoRA or DoRA: a LowRankUpdate), slice by
slice, and adds the active bias shifts (BitFit: a BiasShift) to their output rows (components/contract.py). Embedding tables run
through its subclass in lookup.py, which shares the merge below.

The module's `forward` is replaced on the instance (base weights and state-dict keys untouched);
`remove()` puts the original back.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import BindError, MergeError
from ..points import linear_weight, tied_to
from ..quantized import QuantizedWeight, linear
from .base import Binding, ForwardHook, together


class ProjectionHook(ForwardHook):
    def add(self, binding: Binding) -> None:
        new = binding.point.out_rows
        for other in self.bindings:
            if other.module.bias_only != binding.module.bias_only:
                continue  # a bias shift and a low-rank update combine
            old = other.point.out_rows
            overlap = old.start < new.stop and new.start < old.stop
            if overlap and together(other, binding):
                where = "shared" if binding.group is None else f"task {binding.group!r}"
                what = "bias shifts on the same bias" if binding.module.bias_only else "low-rank updates on the same weights"
                raise BindError(f"two {what} of {binding.point.where()} in {where}: "
                                f"{type(other.module).__name__} and {type(binding.module).__name__}; a projection "
                                f"takes at most one LoRA or DoRA, and one BitFit, among the shared and each task's "
                                f"components")
        super().add(binding)


    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        self._check_not_training_merged()
        active = self.active()
        shifts = [b for b in active if b.module.bias_only]
        y = self._low_rank([b for b in active if not b.module.bias_only], x, *args, **kwargs)
        if not shifts:
            return y
        route = self.adaptation.routing
        if route is None or all(b.group is None for b in shifts):
            return y + _shift(shifts, y.shape[-1]).to(y.dtype)
        groups = [None, *dict.fromkeys(b.group for b in shifts if b.group is not None)]  # shared, then tasks
        mine = [[b for b in shifts if b.group in (None, g)] for g in groups]  # each group's shifts, shared first
        zeros = shifts[0].module.delta.new_zeros(y.shape[-1])
        table = torch.stack([_shift(m, y.shape[-1]) if m else zeros for m in mine])  # (G, out)
        local = route.local(groups, y.shape[0], y.device, self.point.where()).clamp_min(0)  # others: shared row
        return y + table[local].view(y.shape[0], *[1] * (y.dim() - 2), -1).to(y.dtype)

    def _low_rank(self, active: list[Binding], x: Tensor, *args, **kwargs) -> Tensor:
        if not active:
            return self._base(x, *args, **kwargs)
        module = self.point.module
        weight, bias = linear_weight(module), module.bias  # (out, in), (out,)
        units = self._units(active)
        if len(units) == 1 and units[0][0].point.rows is None:
            return self._unit(units[0], x, weight, bias)
        parts, pos = [], 0  # fused projection: adapted slices through their op, the rest plain
        for unit in units:
            rows = unit[0].point.out_rows
            if rows.start > pos:
                parts.append(linear(x, weight[pos:rows.start], None if bias is None else bias[pos:rows.start]))
            parts.append(self._unit(unit, x, weight[rows], None if bias is None else bias[rows]))
            pos = rows.stop
        if pos < weight.shape[0]:
            parts.append(linear(x, weight[pos:], None if bias is None else bias[pos:]))
        return torch.cat(parts, dim=-1)

    def _units(self, active: list[Binding]) -> list[list[Binding]]:
        """The active updates by output rows, in row order: one binding, or (routing) one per task on the
        same rows. Different tasks' updates on overlapping but different rows cannot share one batch."""
        units: dict[tuple[int, int], list[Binding]] = {}
        for b in active:
            units.setdefault((b.point.out_rows.start, b.point.out_rows.stop), []).append(b)
        spans = sorted(units)
        for (s0, e0), (s1, e1) in zip(spans, spans[1:]):
            if s1 < e0:
                raise BindError(f"{self.point.where()}: the routed tasks adapt overlapping but different rows of "
                                f"it (rows {s0}-{e0 - 1} and {s1}-{e1 - 1}); route those tasks' samples in "
                                f"separate batches, or adapt the same sites in each task")
        return [units[span] for span in spans]

    def _unit(self, unit: list[Binding], x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        route = self.adaptation.routing
        if route is None or unit[0].group is None:
            return unit[0].module.linear(x, weight, bias)
        local = route.local([b.group for b in unit], x.shape[0], x.device, self.point.where())
        return type(unit[0].module).routed_linear([b.module for b in unit], x, weight, bias, local)

    # ---- merge / unmerge: W[rows] (b[rows] for BitFit) <- the merged value; the replaced rows kept here (a
    # quantized weight: dequantized, the rows replaced, requantized; its whole former storage kept here)

    def _rows(self, binding: Binding) -> Tensor | QuantizedWeight:
        """What merging `binding` changes: the rows of the bias for a bias shift, else of the (out, in) weight."""
        module = self.point.module
        target = module.bias if binding.module.bias_only else linear_weight(module)
        return None if target is None else target[binding.point.out_rows]

    def _merged(self, binding: Binding, rows: Tensor | QuantizedWeight) -> Tensor:
        if isinstance(rows, QuantizedWeight):
            rows = rows.dequantize()
        return binding.module.merged_bias(rows) if binding.module.bias_only else binding.module.merged_weight(rows)

    def mergeable(self) -> list[Binding]:
        module = self.point.module
        out = []
        for b in self.active():
            what = f"{type(b.module).__name__} at {b.point.where()}"
            rows = self._rows(b)
            if rows is None:
                raise MergeError(f"cannot merge {what}: the layer has no bias to add the shift into (BitFit on a "
                                 f"layer without bias runs unmerged); nothing was merged")
            param = module.bias if b.module.bias_only else module.weight
            tied = tied_to(self.adaptation.model, module, param)
            if tied:
                raise MergeError(f"cannot merge {what}: its weight is tied to {', '.join(tied)}, which merging "
                                 f"would change too; nothing was merged")
            if isinstance(rows, QuantizedWeight) and not rows.requantizable:
                raise MergeError(f"cannot merge {what}: its layer is quantized ({rows.scheme}), which adaptune does "
                                 f"not requantize (the quantizer's config is not kept with the layer); merge into a "
                                 f"float copy of the model instead; nothing was merged")
            with torch.no_grad():
                merged = self._merged(b, rows).to(rows.dtype)  # as merge() writes it (before requantization)
                if not torch.isfinite(merged).all():
                    raise MergeError(f"merging {what} gives non-finite weights in {rows.dtype} (NaN or inf in its "
                                     f"parameters, or values beyond the dtype's range); nothing was merged")
            out.append(b)
        return out

    @torch.no_grad()
    def merge(self, bindings: list[Binding]) -> dict[str, tuple[float, float]]:
        errors = {}
        for b in bindings:
            view = self._rows(b)
            if isinstance(view, QuantizedWeight):
                self._backups[b] = view.storage()
                errors[b.point.where()] = view.requantize(self._merged(b, view))
            else:
                self._backups[b] = view.clone()
                view.copy_(self._merged(b, view).to(view.dtype))
        return errors

    @torch.no_grad()
    def unmerge(self) -> None:
        for b, backup in reversed(self._backups.items()):  # last first: a quantized layer ends as it began
            view = self._rows(b)
            if isinstance(view, QuantizedWeight):
                view.restore(backup)
            else:
                view.copy_(backup)
        self._backups.clear()


def _shift(bindings: list[Binding], d_out: int) -> Tensor:
    """The active bias shifts as one (out,) vector, zeros on rows none covers."""
    parts, pos = [], 0
    for b in sorted(bindings, key=lambda b: b.point.out_rows.start):
        rows, delta = b.point.out_rows, b.module.delta
        if rows.start > pos:
            parts.append(delta.new_zeros(rows.start - pos))
        parts.append(delta)
        pos = rows.stop
    if pos < d_out:
        parts.append(parts[-1].new_zeros(d_out - pos))
    return parts[0] if len(parts) == 1 else torch.cat(parts)
