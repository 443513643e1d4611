"""Prefix tuning (Li & Liang): n trainable key/value positions in front of every self-attention.

Each bound layer gets keys and values of shape (n, H_kv·D), put in front of the layer's own keys and
values for every query (see hooks/attention.py). They take no positions and never enter the KV cache.

Direct (hidden=None): per-layer parameters, initialised N(0, 0.02²). Parameters: 2·n·H_kv·D per layer.

Reparameterised (hidden=h), as in the paper: one MLP shared by all layers the component binds to,
    E (n, d_model) -> Linear(d_model, h) -> tanh -> Linear(h, L·2·H_kv·D)
and layer i takes its slice of the output. E ~ N(0, 1) (an nn.Embedding's init), Linears at torch's
default init. Parameters: n·d + d·h + h + h·L·2·kv + L·2·kv. Each layer computes only its own rows
of the last Linear, so the cost stays per layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..points import ATTENTION, Point, check_attention_point
from .base import Component, check_positive
from .contract import Context

INIT_STD = 0.02  # direct prefixes


@dataclass(frozen=True)
class Prefix(Component):
    n: int = 30
    hidden: int | None = None  # None: direct parameters; h: Li & Liang's MLP reparameterisation

    kind = ATTENTION

    def __post_init__(self) -> None:
        check_positive("n", self.n)
        if self.hidden is not None:
            check_positive("hidden", self.hidden)

    def shared(self, ctx) -> "PrefixEncoder | None":
        if self.hidden is None:
            return None
        config = getattr(ctx.sites.model, "config", None)
        first = ctx.points[0]
        d_model = getattr(config, "hidden_size", None) or first.n_kv_heads * first.head_dim
        return PrefixEncoder(self.n, d_model, self.hidden, ctx.points)

    def bind(self, point: Point, shared: "PrefixEncoder | None" = None) -> "PrefixModule":
        check_attention_point(point, repr(self))
        return PrefixModule(self, point, shared)


class PrefixEncoder(nn.Module):
    """Li & Liang's MLP: one embedding of the n virtual tokens mapped to every layer's keys and values."""

    def __init__(self, n: int, d_model: int, hidden: int, points: list[Point]) -> None:
        super().__init__()
        self.kv_dims = [p.n_kv_heads * p.head_dim for p in points]
        self.offsets = {p.key: sum(2 * d for d in self.kv_dims[:i]) for i, p in enumerate(points)}
        self.embedding = nn.Parameter(torch.randn(n, d_model))  # (n, d)
        self.down = nn.Linear(d_model, hidden)  # (h, d)
        self.up = nn.Linear(hidden, 2 * sum(self.kv_dims))  # (L·2·kv, h)

    def forward(self, key: str, kv_dim: int) -> tuple[Tensor, Tensor]:
        """Keys and values of the point named `key`: (n, kv_dim) each."""
        start = self.offsets[key]
        rows = slice(start, start + 2 * kv_dim)
        h = torch.tanh(self.down(self.embedding))  # (n, h)
        out = F.linear(h, self.up.weight[rows], self.up.bias[rows])  # (n, 2·kv)
        return out[:, :kv_dim], out[:, kv_dim:]


class PrefixModule(nn.Module):
    """The prefix of one attention layer: own parameters, or a slice of a shared PrefixEncoder; an
    AttentionModule (components/contract.py)."""
    bidirectional = False

    def __init__(self, component: Prefix, point: Point, shared: PrefixEncoder | None) -> None:
        super().__init__()
        self.n, self.kv_dim, self.key = component.n, point.n_kv_heads * point.head_dim, point.key
        object.__setattr__(self, "encoder", shared)  # not a submodule: registered once, in the group's common
        if shared is None:
            self.keys = nn.Parameter(torch.randn(component.n, self.kv_dim) * INIT_STD)  # (n, H_kv·D)
            self.values = nn.Parameter(torch.randn(component.n, self.kv_dim) * INIT_STD)  # (n, H_kv·D)

    def kv(self, context: Context | None = None) -> tuple[Tensor, Tensor]:
        """(keys, values), each (n, H_kv·D), the same for every sample."""
        if self.encoder is not None:
            return self.encoder(self.key, self.kv_dim)
        return self.keys, self.values

    def extra_repr(self) -> str:
        return f"n={self.n}, kv_dim={self.kv_dim}" + (", shared encoder" if self.encoder is not None else "")
