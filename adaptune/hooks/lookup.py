"""Routes an embedding table (nn.Embedding) through its active LoRA: y = E[ids] + s·Aᵀ[ids]·Bᵀ.

The table's own forward still looks up the base rows (its padding_idx, max_norm, a scaled embedding's
embed_scale); merging is the projection's, on the (dim, num) view W = Eᵀ: E += s·(B·A)ᵀ, refused when
E is tied to another module (GPT-2's wte and lm_head share it), while the unmerged forward works.
"""
from __future__ import annotations

from torch import Tensor

from .projection import ProjectionHook
from .route import per_rows


class LookupHook(ProjectionHook):
    def forward(self, ids: Tensor, *args, **kwargs) -> Tensor:
        self._check_not_training_merged()
        y = self._base(ids, *args, **kwargs)
        table, route = self.point.module, self.adaptation.routing
        active = self.active()
        for b in active if route is None else [b for b in active if b.group is None]:
            y = y + b.module.lookup(ids, table).to(y.dtype)
        tasks = [] if route is None else [b for b in active if b.group is not None]
        if tasks:  # inside route(): each sample's task's update, on its rows (at most one per task here)
            y = per_rows(route, [b.group for b in tasks], ids.shape[0], ids.device, self.point.where(),
                         lambda i, rows: y.index_select(0, rows) + tasks[i].module.lookup(ids.index_select(0, rows),
                                                                                          table).to(y.dtype), y)
        return y
