"""DoRA (Liu et al.): y = (m / n) ⊙ (x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ) + b, n_i = ‖W_i + s·B_i·A‖.

The magnitude m starts at the row norms of W, so a fresh DoRA is the identity. The norm is
computed by the factored formula (ops.dora_norm) with ‖W_i‖² cached while W is unchanged, and is
detached from the graph by default (DoRA paper §4.3); `detach_norm=False` backpropagates through it.

On a mixture of experts ('ffn.experts[.gate_up|down]'), each expert's weight W_e (out, in) is decomposed on its
own: a magnitude (E, out) and n_e the row norms of W_e + s·B_e·A_e, expert e computing
(m_e / n_e) ⊙ (x·W_eᵀ + s·(drop(x)·A_eᵀ)·B_eᵀ) on its tokens (experts="one": one factor pair, E magnitudes).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import ops
from ..errors import BindError, ConfigError
from ..points import EXPERTS, Point, expert_weight, is_table, linear_weight
from ..quantized import QuantizedWeight, row_norm_sq
from .lora import ExpertsLoRAModule, LoRA, LoRAModule


@dataclass(frozen=True, repr=False)
class DoRA(LoRA):
    detach_norm: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init != "default":
            raise ConfigError(f"DoRA supports init='default' only, got init={self.init!r}: its magnitude starts at "
                              f"‖W_i‖, which PiSSA / OLoRA's residual would change; use LoRA(init={self.init!r})")

    def bind(self, point: Point, shared=None) -> "DoRAModule | ExpertsDoRAModule":
        if point.kind == EXPERTS:
            return ExpertsDoRAModule(self, point)
        if is_table(point.module):
            raise BindError(f"{self!r} cannot bind to {point.site!r}: DoRA rescales the rows of a Linear / Conv1D "
                            f"weight, not an embedding table; use LoRA on embeddings, DoRA on attn (q, k, v), "
                            f"attn.q|k|v|o, ffn (up, down), ffn.up|down|gate, or a Linear/Conv1D module path")
        return DoRAModule(self, point)


class WeightNormCache:
    """‖W_i‖² of the frozen weight, recomputed only when it changes (a DoRA module's `_norm_cache`)."""
    _norm_cache: tuple[tuple, Tensor] | None

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


class DoRAModule(WeightNormCache, LoRAModule):
    rescales_rows = True

    def __init__(self, component: DoRA, point: Point) -> None:
        super().__init__(component, point)
        weight = linear_weight(point.module)[point.out_rows]  # (out, in)
        self.magnitude = nn.Parameter(row_norm_sq(weight).sqrt())  # (out,)
        self.detach_norm = component.detach_norm
        self._norm_cache = None

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return ops.dora(x, weight, bias, self.A, self.B, self.magnitude, self.scale, self.dropout,
                        self.training, self._weight_norm_sq(weight), self.detach_norm)

    def merged_weight(self, weight: Tensor) -> Tensor:
        """(m / n) ⊙ (W + s·B·A) row-wise, W a float tensor."""
        w = super().merged_weight(weight)
        return (self.magnitude.float() / w.norm(dim=1)).unsqueeze(1) * w


class ExpertsDoRAModule(WeightNormCache, ExpertsLoRAModule):
    """DoRA on one fused expert weight (E, out, in): ExpertsLoRAModule's factors and a magnitude (E, out)."""
    rescales_rows = True

    def __init__(self, component: DoRA, point: Point) -> None:
        super().__init__(component, point)
        self.magnitude = nn.Parameter(row_norm_sq(expert_weight(point)).sqrt())  # (E, out)
        self.detach_norm = component.detach_norm
        self._norm_cache = None

    def row_scale(self, weight: Tensor) -> Tensor:
        """m_e / n_e (E, out), n_e the row norms of W_e + s·B_e·A_e (detached unless detach_norm=False)."""
        n = weight.shape[0]
        A = self.A if self.each else self.A.expand(n, *self.A.shape)
        B = self.B if self.each else self.B.expand(n, *self.B.shape)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.detach_norm):
            norm = ops.dora_norm(weight, A, B, self.scale, self._weight_norm_sq(weight))  # (E, out)
        return self.magnitude / norm

    def merged_weight(self, weight: Tensor) -> Tensor:
        """(m_e / n_e) ⊙ (W_e + s·B_e·A_e) row-wise for every expert, W (E, out, in) a float tensor."""
        w = super().merged_weight(weight)
        return (self.magnitude.float() / w.norm(dim=-1)).unsqueeze(-1) * w
