"""BitFit (Ben Zaken et al.) on projection sites ("attn": q, k, v; "ffn"; "attn.o"; Linear paths):
y = x·Wᵀ + b + δ with δ (out,) starting at zero. The base bias is untouched (detach is bit-exact) and
a layer without bias gets one. merge() adds δ into the base bias (exactly undone by unmerge); a layer
without bias has nothing to merge into, and merge() refuses it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import BindError
from ..points import PROJECTION, Point, is_table
from .base import Component


@dataclass(frozen=True)
class BitFit(Component):
    """Train a bias shift δ (out,) on projections: y = x·Wᵀ + b + δ, δ = 0 at first."""

    kind = PROJECTION

    def bind(self, point: Point, shared=None) -> "BitFitModule":
        if is_table(point.module):
            raise BindError(f"{self!r} cannot bind to {point.site!r}: an embedding table has no bias to shift; "
                            f"BitFit binds to attn (q, k, v), attn.q|k|v|o, ffn (up, down), ffn.up|down|gate, or a "
                            f"Linear/Conv1D module path")
        return BitFitModule(point.dim_out)


class BitFitModule(nn.Module):
    """The bias shift of one projection: a BiasShift (components/contract.py)."""
    bias_only = True  # the projection hook adds `delta` to the output rows instead of calling `linear`

    def __init__(self, d_out: int) -> None:
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(d_out))  # (out,)

    def merged_bias(self, bias: Tensor) -> Tensor:
        """b + δ, in float32 at least; used only by merge()."""
        return bias.float() + self.delta.float()
