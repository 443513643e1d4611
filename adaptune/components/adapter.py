"""Bottleneck adapters: Houlsby (serial) and He et al. (parallel).

serial:   y = h + s·up(act(down(h)))   with h the sublayer output, before residual and norm
parallel: y = h + s·up(act(down(x)))   with x the sublayer input
up starts at zero, so a fresh adapter is the identity. Parameters: 2·m·d + d + m.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..points import SUBLAYER, Point
from .base import Component, check_choice, check_positive
from .contract import Context

PLACEMENTS = ("serial", "parallel")


@dataclass(frozen=True)
class Adapter(Component):
    dim: int = 64
    act: str = "relu"
    placement: str = "serial"
    scale: float = 1.0

    kind = SUBLAYER

    def __post_init__(self) -> None:
        check_positive("dim", self.dim)
        check_choice("act", self.act, tuple(ops.ACTIVATIONS))
        check_choice("placement", self.placement, PLACEMENTS)
        check_positive("scale", self.scale, (int, float))  # type: ignore[arg-type]

    def bind(self, point: Point, shared=None) -> "AdapterModule":
        return AdapterModule(self, point)


class AdapterModule(nn.Module):
    """One sublayer's bottleneck: a SublayerModule (components/contract.py)."""

    def __init__(self, component: Adapter, point: Point) -> None:
        super().__init__()
        d_in = point.dim_in if component.placement == "parallel" else point.dim_out
        self.down_weight = nn.Parameter(torch.empty(component.dim, d_in))  # (m, d)
        self.down_bias = nn.Parameter(torch.zeros(component.dim))
        self.up_weight = nn.Parameter(torch.zeros(point.dim_out, component.dim))  # (d, m)
        self.up_bias = nn.Parameter(torch.zeros(point.dim_out))
        nn.init.kaiming_uniform_(self.down_weight, a=math.sqrt(5))
        self.act, self.scale, self.parallel = component.act, component.scale, component.placement == "parallel"

    def forward(self, h: Tensor, x: Tensor | None, context: Context | None = None) -> Tensor:
        """h: sublayer output (..., d); x: sublayer input, used by the parallel placement."""
        src = x if self.parallel else h
        return ops.bottleneck(src, h, self.down_weight, self.down_bias, self.up_weight, self.up_bias,
                              self.scale, self.act)

    @staticmethod
    def routed(modules: list["AdapterModule"], h: Tensor, x: Tensor | None, index: Tensor) -> Tensor:
        """Each sample n through modules[index[n]] (-1: unchanged), one routed op per placement and activation
        among them (each sample is in one: applying them in turn is exact)."""
        m_max = max(m.down_weight.shape[0] for m in modules)  # bottlenecks zero-padded to the widest
        down = torch.stack([F.pad(m.down_weight, (0, 0, 0, m_max - m.down_weight.shape[0])) for m in modules])
        down_bias = torch.stack([F.pad(m.down_bias, (0, m_max - m.down_bias.shape[0])) for m in modules])  # (T, m)
        up = torch.stack([F.pad(m.up_weight, (0, m_max - m.up_weight.shape[1])) for m in modules])  # (T, d, m)
        up_bias = torch.stack([m.up_bias for m in modules])  # (T, d)
        scale = torch.tensor([m.scale for m in modules], device=h.device)
        for kind in dict.fromkeys((m.parallel, m.act) for m in modules):
            mine = torch.tensor([(m.parallel, m.act) == kind for m in modules], device=index.device)
            sub = index.masked_fill(~(mine[index.clamp_min(0)] & (index >= 0)), -1)
            h = ops.bottleneck_routed(x if kind[0] else h, h, down, down_bias, up, up_bias, scale, sub, kind[1])
        return h
