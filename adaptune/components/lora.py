"""LoRA (Hu et al.): y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ with s = alpha / r; B starts at zero."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import ops
from ..errors import BindError
from ..points import PROJECTION, Point
from .base import Component, check_dropout, check_positive


@dataclass(frozen=True)
class LoRA(Component):
    r: int = 8
    alpha: float | None = None  # None: alpha = r, so s = 1
    dropout: float = 0.0

    role = PROJECTION

    def __post_init__(self) -> None:
        check_positive("r", self.r)
        if self.alpha is not None:
            check_positive("alpha", self.alpha, (int, float))  # type: ignore[arg-type]
        check_dropout(self.dropout)

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.r) / self.r

    def bind(self, point: Point, shared=None) -> "LoRAModule":
        return LoRAModule(self, point)


class LoRAModule(nn.Module):
    """The low-rank factors of one projection (or one slice of a fused projection)."""

    def __init__(self, component: LoRA, point: Point) -> None:
        super().__init__()
        r, d_in, d_out = component.r, point.dim_in, point.dim_out
        if r > min(d_in, d_out):
            raise BindError(f"{component!r} at {point.site} (layer {point.layer}): r={r} is larger than the layer "
                            f"({d_out}×{d_in}); r must be in 1..{min(d_in, d_out)}")
        self.A = nn.Parameter(torch.empty(r, d_in))  # (r, in)
        self.B = nn.Parameter(torch.zeros(d_out, r))  # (out, r)
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scale, self.dropout = component.scale, component.dropout

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return ops.lora(x, weight, bias, self.A, self.B, self.scale, self.dropout, self.training)

    def merged_weight(self, weight: Tensor) -> Tensor:
        """W + s·B·A, in float32 at least; used only by merge()."""
        w = weight.float()
        return w + self.scale * (self.B.float() @ self.A.float())
