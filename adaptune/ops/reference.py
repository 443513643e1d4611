"""Pure-PyTorch reference of every op: the fallback on every machine and the oracle of every test.

Shapes: x (..., in), weight (out, in), bias (out,), A (r, in), B (out, r), magnitude (out,).
Precision: the components' part runs in their parameters' dtype (float32 on a half-precision base),
and the sum is returned in the base's dtype, as PEFT does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "silu": F.silu,
    "tanh": torch.tanh,
    "identity": lambda t: t,
}


def _drop(x: Tensor, p: float, training: bool) -> Tensor:
    return F.dropout(x, p, training) if p > 0.0 and training else x


def lora(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float,
         dropout: float = 0.0, training: bool = False) -> Tensor:
    """y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ — W is never combined with B·A."""
    y = F.linear(x, weight, bias)  # (..., out)
    low = F.linear(F.linear(_drop(x, dropout, training).to(A.dtype), A), B)  # (..., r) -> (..., out)
    return (y + scale * low).to(y.dtype)


def dora_norm(weight: Tensor, A: Tensor, B: Tensor, scale: float,
              weight_norm_sq: Tensor | None = None) -> Tensor:
    """Row norms n_i = ‖W_i + s·B_i·A‖ by the factored formula, without an (out, in) temporary.

    n² = ‖W_i‖² + 2s·(W·Aᵀ)_i·B_i + s²·B_i·(A·Aᵀ)·B_iᵀ, computed in float32 at least.
    """
    dtype = torch.promote_types(weight.dtype, torch.float32)
    W, A, B = weight.to(dtype), A.to(dtype), B.to(dtype)
    if weight_norm_sq is None:
        weight_norm_sq = W.pow(2).sum(1)  # (out,)
    WA = W @ A.t()  # (out, r)
    AA = A @ A.t()  # (r, r)
    sq = weight_norm_sq.to(dtype) + 2 * scale * (WA * B).sum(1) + scale**2 * ((B @ AA) * B).sum(1)
    return sq.clamp_min(0).sqrt()


def dora(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, magnitude: Tensor,
         scale: float, dropout: float = 0.0, training: bool = False,
         weight_norm_sq: Tensor | None = None, detach_norm: bool = True) -> Tensor:
    """y = (m / n) ⊙ (x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ) + b with n the row norms of W + s·B·A."""
    if detach_norm:
        with torch.no_grad():
            norm = dora_norm(weight, A, B, scale, weight_norm_sq)
    else:
        norm = dora_norm(weight, A, B, scale, weight_norm_sq)
    dtype = torch.promote_types(x.dtype, A.dtype)
    y = F.linear(x, weight).to(dtype)  # (..., out)
    y = y + scale * F.linear(F.linear(_drop(x, dropout, training).to(A.dtype), A), B).to(dtype)
    y = (y * (magnitude / norm).to(dtype)).to(x.dtype)
    return y + bias if bias is not None else y


def bottleneck(x: Tensor, residual: Tensor, down_weight: Tensor, down_bias: Tensor | None,
               up_weight: Tensor, up_bias: Tensor | None, scale: float = 1.0,
               act: str = "relu") -> Tensor:
    """y = residual + s·up(act(down(x))). Serial placement: x is residual; parallel: x is the sublayer input."""
    h = ACTIVATIONS[act](F.linear(x.to(down_weight.dtype), down_weight, down_bias))  # (..., m)
    return (residual + scale * F.linear(h, up_weight, up_bias)).to(residual.dtype)  # (..., d)
