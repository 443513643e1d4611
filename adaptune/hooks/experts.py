"""Routes a mixture of experts (transformers' fused experts: gate_up_proj (E, 2I, H), down_proj (E, H, I)) through
the active low-rank updates of its weights (LoRA per expert: an ExpertsUpdate, components/contract.py).

The experts module's `forward(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k))` is replaced on the
instance (whatever experts implementation its config names; weights and state-dict keys untouched), by the
reference loop over the experts that tokens are routed to, as transformers' eager forward:

    gate, up = (x·W_gate_up,eᵀ + Δ_gate_up,e(x)).chunk(2);  h = act_fn(gate) · up
    y_e = (h·W_down,eᵀ + Δ_down,e(h)) · routing weight;  summed over each token's experts

With no update active the original forward runs. `remove()` puts the original back.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..components.contract import ExpertsUpdate
from ..errors import BindError, MergeError, TaskError
from ..points import expert_weight
from .base import Binding, ForwardHook, together


class ExpertsHook(ForwardHook):
    def add(self, binding: Binding) -> None:
        if not isinstance(binding.module, ExpertsUpdate):
            raise BindError(f"{type(binding.module).__name__} cannot bind to {binding.point.site!r}: a mixture of "
                            f"experts' fused weights take LoRA only")
        for other in self.bindings:
            if other.point.part == binding.point.part and together(other, binding):
                where = "shared" if binding.group is None else f"task {binding.group!r}"
                raise BindError(f"two low-rank updates of {binding.point.where()} in {where}: an experts weight takes "
                                f"at most one LoRA among the shared and each task's components")
        super().add(binding)

    def forward(self, *args, **kwargs):
        self._check_not_training_merged()
        active = self.active()
        if not active:
            return self._base(*args, **kwargs)
        if self.adaptation.routing is not None and any(b.group is not None for b in active):
            raise TaskError(f"{self.point.where()}: a route() that mixes tasks cannot run per-task LoRA on a mixture "
                            f"of experts (its tokens are flattened across samples); run one task per forward (use(), "
                            f"or a route() of one task), or put the experts' LoRA in the shared set")
        return self._experts(*args, updates={b.point.part: b.module for b in active}, **kwargs)

    def _experts(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor, *,
                 updates: dict[str, ExpertsUpdate]) -> Tensor:
        module = self.point.module
        gate_up, down = module.gate_up_proj, module.down_proj  # (E, 2I, H), (E, H, I)
        n = gate_up.shape[0]
        out = torch.zeros_like(hidden_states)  # (T, H)
        with torch.no_grad():
            mask = F.one_hot(top_k_index, num_classes=n + 1).permute(2, 1, 0)  # (E + 1, k, T)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        up_update, down_update = updates.get("gate_up"), updates.get("down")
        for e in hit[:, 0].tolist():
            if e == n:  # the slot of tokens routed elsewhere (expert parallel)
                continue
            slot, token = torch.where(mask[e])
            x = hidden_states[token]  # (t, H)
            h = F.linear(x, gate_up[e])  # (t, 2I)
            if up_update is not None:
                h = h + up_update.delta(x, e)
            gate, up = h.chunk(2, dim=-1)
            h = module.act_fn(gate) * up  # (t, I)
            y = F.linear(h, down[e])  # (t, H)
            if down_update is not None:
                y = y + down_update.delta(h, e)
            y = y * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out

    # ---- merge / unmerge: W_e <- W_e + s·B_e·A_e for every expert; the whole former weight kept here

    def mergeable(self) -> list[Binding]:
        out = []
        for b in self.active():
            weight = expert_weight(b.point)
            with torch.no_grad():
                merged = b.module.merged_weight(weight).to(weight.dtype)
            if not torch.isfinite(merged).all():
                raise MergeError(f"merging {type(b.module).__name__} at {b.point.where()} gives non-finite weights "
                                 f"in {weight.dtype}; nothing was merged")
            out.append(b)
        return out

    @torch.no_grad()
    def merge(self, bindings: list[Binding]) -> dict[str, tuple[float, float]]:
        for b in bindings:
            weight = expert_weight(b.point)
            self._backups[b] = weight.detach().clone()
            weight.copy_(b.module.merged_weight(weight).to(weight.dtype))
        return {}

    @torch.no_grad()
    def unmerge(self) -> None:
        for b, backup in reversed(self._backups.items()):  # last first: the weight ends as it began
            expert_weight(b.point).copy_(backup)
        self._backups.clear()
