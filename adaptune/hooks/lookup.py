"""Routes an embedding table (nn.Embedding) through its active LoRA: y = E[ids] + s·Aᵀ[ids]·Bᵀ.

The table's own forward still looks up the base rows (its padding_idx, max_norm, a scaled embedding's
embed_scale); merging is the projection's, on the (dim, num) view W = Eᵀ: E += s·(B·A)ᵀ, refused when
E is tied to another module (GPT-2's wte and lm_head share it), while the unmerged forward works.
"""
from __future__ import annotations

from torch import Tensor

from .projection import ProjectionHook


class LookupHook(ProjectionHook):
    def forward(self, ids: Tensor, *args, **kwargs) -> Tensor:
        self._check_not_training_merged()
        y = self._base(ids, *args, **kwargs)
        for b in self.active():
            y = y + b.module.lookup(ids, self.point.module).to(y.dtype)
        return y
