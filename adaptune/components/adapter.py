"""Bottleneck adapters: Houlsby (serial) and He et al. (parallel).

serial:   y = h + s·up(act(down(h)))   with h the sublayer output, before residual and norm
parallel: y = h + s·up(act(down(x)))   with x the sublayer input
up starts at zero, so a fresh adapter is the identity. Parameters: 2·m·d + d + m.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import ops
from ..points import SUBLAYER, Point
from .base import Component, check_choice, check_positive

PLACEMENTS = ("serial", "parallel")


@dataclass(frozen=True)
class Adapter(Component):
    dim: int = 64
    act: str = "relu"
    placement: str = "serial"
    scale: float = 1.0

    role = SUBLAYER

    def __post_init__(self) -> None:
        check_positive("dim", self.dim)
        check_choice("act", self.act, tuple(ops.ACTIVATIONS))
        check_choice("placement", self.placement, PLACEMENTS)
        check_positive("scale", self.scale, (int, float))  # type: ignore[arg-type]

    def bind(self, point: Point, shared=None) -> "AdapterModule":
        return AdapterModule(self, point)


class AdapterModule(nn.Module):
    def __init__(self, component: Adapter, point: Point) -> None:
        super().__init__()
        d_in = point.dim_in if component.placement == "parallel" else point.dim_out
        self.down_weight = nn.Parameter(torch.empty(component.dim, d_in))  # (m, d)
        self.down_bias = nn.Parameter(torch.zeros(component.dim))
        self.up_weight = nn.Parameter(torch.zeros(point.dim_out, component.dim))  # (d, m)
        self.up_bias = nn.Parameter(torch.zeros(point.dim_out))
        nn.init.kaiming_uniform_(self.down_weight, a=math.sqrt(5))
        self.act, self.scale, self.parallel = component.act, component.scale, component.placement == "parallel"

    def forward(self, h: Tensor, x: Tensor | None) -> Tensor:
        """h: sublayer output (..., d); x: sublayer input, used by the parallel placement."""
        src = x if self.parallel else h
        return ops.bottleneck(src, h, self.down_weight, self.down_bias, self.up_weight, self.up_bias,
                              self.scale, self.act)
