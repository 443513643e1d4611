"""DoRA (Liu et al.): y = (m / n) ⊙ (x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ) + b, n_i = ‖W_i + s·B_i·A‖.

The magnitude m starts at the row norms of W, so a fresh DoRA is the identity. The norm is
computed by the factored formula (ops.dora_norm) with ‖W_i‖² cached while W is unchanged, and is
detached from the graph by default (DoRA paper §4.3); `detach_norm=False` backpropagates through it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import ops
from ..errors import BindError, ConfigError
from ..points import EXPERTS, Point, is_table, linear_weight
from ..quantized import QuantizedWeight, row_norm_sq
from .lora import LoRA, LoRAModule


@dataclass(frozen=True, repr=False)
class DoRA(LoRA):
    detach_norm: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init != "default":
            raise ConfigError(f"DoRA supports init='default' only, got init={self.init!r}: its magnitude starts at "
                              f"‖W_i‖, which PiSSA / OLoRA's residual would change; use LoRA(init={self.init!r})")

    def bind(self, point: Point, shared=None) -> "DoRAModule":
        if point.kind == EXPERTS:
            raise BindError(f"{self!r} cannot bind to {point.site!r}: DoRA on a mixture of experts' fused weights is "
                            f"not supported (it would rescale every expert's rows); use LoRA on ffn.experts, or DoRA "
                            f"on attention sites")
        if is_table(point.module):
            raise BindError(f"{self!r} cannot bind to {point.site!r}: DoRA rescales the rows of a Linear / Conv1D "
                            f"weight, not an embedding table; use LoRA on embeddings, DoRA on attn (q, k, v), "
                            f"attn.q|k|v|o, ffn (up, down), ffn.up|down|gate, or a Linear/Conv1D module path")
        return DoRAModule(self, point)


class DoRAModule(LoRAModule):
    rescales_rows = True

    def __init__(self, component: DoRA, point: Point) -> None:
        super().__init__(component, point)
        weight = linear_weight(point.module)[point.out_rows]  # (out, in)
        self.magnitude = nn.Parameter(row_norm_sq(weight).sqrt())  # (out,)
        self.detach_norm = component.detach_norm
        self._norm_cache: tuple[tuple, Tensor] | None = None

    def _weight_norm_sq(self, weight: Tensor) -> Tensor:
        """‖W_i‖², recomputed only when the (frozen) weight changes.

        Under torch.compile it is part of the graph: the cache key holds a data pointer, which the
        compiler cannot compare once the cache is filled by an eager call.
        """
        if torch.compiler.is_compiling():
            return row_norm_sq(weight)
        key = weight.key() if isinstance(weight, QuantizedWeight) else \
            (weight.data_ptr(), weight._version, tuple(weight.shape), weight.device, weight.dtype)
        if self._norm_cache is None or self._norm_cache[0] != key:
            self._norm_cache = (key, row_norm_sq(weight))
        return self._norm_cache[1]

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return ops.dora(x, weight, bias, self.A, self.B, self.magnitude, self.scale, self.dropout,
                        self.training, self._weight_norm_sq(weight), self.detach_norm)

    def merged_weight(self, weight: Tensor) -> Tensor:
        """(m / n) ⊙ (W + s·B·A) row-wise, W a float tensor."""
        w = super().merged_weight(weight)
        return (self.magnitude.float() / w.norm(dim=1)).unsqueeze(1) * w
