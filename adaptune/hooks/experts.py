"""Routes a mixture of experts (transformers' fused experts: gate_up_proj (E, 2I, H), down_proj (E, H, I)) through
the active low-rank updates of its weights (LoRA or DoRA per expert: an ExpertsUpdate, components/contract.py).

The experts module's `forward(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k))` is replaced on the
instance (whatever experts implementation its config names; weights and state-dict keys untouched). The (token,
expert) pairs are sorted by expert, and each weight with its update is one ops.grouped_lora over all of them:

    gate, up = U_gate_up(x).chunk(2);  h = act_fn(gate) · up;  y = U_down(h) · routing weight
    U_e(x) = r_e ⊙ (x·W_eᵀ + s·(drop(x)·A_eᵀ)·B_eᵀ)  (a weight without an update: x·W_eᵀ);  y summed over each
    token's experts

as transformers' grouped forward does. Pairs routed to an expert this process does not hold (expert parallelism:
an index ≥ E) add nothing. With no update active the original forward runs. `remove()` puts the original back.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from ..components.contract import ExpertsUpdate
from ..errors import BindError, MergeError, TaskError
from ..points import expert_weight
from .base import Binding, ForwardHook, together


class ExpertsHook(ForwardHook):
    def add(self, binding: Binding) -> None:
        if not isinstance(binding.module, ExpertsUpdate):
            raise BindError(f"{type(binding.module).__name__} cannot bind to {binding.point.site!r}: a mixture of "
                            f"experts' fused weights take LoRA or DoRA only")
        for other in self.bindings:
            if other.point.part == binding.point.part and together(other, binding):
                where = "shared" if binding.group is None else f"task {binding.group!r}"
                raise BindError(f"two low-rank updates of {binding.point.where()} in {where}: an experts weight takes "
                                f"at most one LoRA or DoRA among the shared and each task's components")
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
        n = module.gate_up_proj.shape[0]
        tokens, k = top_k_index.shape
        pairs = top_k_index.reshape(-1)  # (T·k,) the expert of each (token, slot)
        order = torch.sort(pairs, stable=True).indices
        counts = torch.bincount(pairs.clamp(max=n), minlength=n + 1)[:n]  # index ≥ E: held elsewhere, sorted last
        offsets = counts.cumsum(0)
        held = order[:int(offsets[-1])]  # (S,) the pairs of this process's experts, grouped by expert
        x = hidden_states[held // k]  # (S, H)
        gate, up = _project(x, offsets, module.gate_up_proj, updates.get("gate_up")).chunk(2, dim=-1)
        y = _project(module.act_fn(gate) * up, offsets, module.down_proj, updates.get("down"))  # (S, H)
        y = y * top_k_weights.reshape(-1)[held, None].to(y.dtype)
        out = y.new_zeros(tokens * k, y.shape[-1]).index_copy(0, held, y)
        return out.view(tokens, k, -1).sum(dim=1).to(hidden_states.dtype)

    # ---- merge / unmerge: W_e <- the update folded in for every expert (LoRA: W_e + s·B_e·A_e; DoRA: its rows
    # rescaled to m_e); the whole former weight kept here

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


def _project(x: Tensor, offsets: Tensor, weight: Tensor, update: ExpertsUpdate | None) -> Tensor:
    """Each expert's rows of x through its weight W_e (E, out, in) and the update's part of it, if any."""
    if update is None:
        return ops.grouped_lora(x, offsets, weight, None, None, 0.0)
    return ops.grouped_lora(x, offsets, weight, update.A, update.B, update.scale, update.row_scale(weight),
                            update.dropout, update.training)
