"""Bidirectional(): the selected attention layers see the whole sequence, not only its past.

Drops the causal mask of a causal LM's attention (turning decoder layers into encoder layers, as
AdaVAE's encoder does); the padding mask is kept, so padded positions stay unseen. No parameters.
Eager and sdpa attention; it acts where the model runs without a KV cache (a cached step sees
everything before it anyway).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..points import ATTENTION, Point, check_attention_point
from .base import Component
from .contract import Context


@dataclass(frozen=True)
class Bidirectional(Component):
    kind = ATTENTION

    def bind(self, point: Point, shared=None) -> "BidirectionalModule":
        check_attention_point(point, repr(self))
        return BidirectionalModule()


class BidirectionalModule(nn.Module):
    """An AttentionModule (components/contract.py) that drops the causal mask and adds no keys."""
    bidirectional = True

    def kv(self, context: Context) -> None:
        return None
