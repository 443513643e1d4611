"""Pure-PyTorch reference of every op: the fallback on every machine and the oracle of every test.

Shapes: x (..., in), weight (out, in), bias (out,), A (r, in), B (out, r), magnitude (out,). The weight is a
tensor, or a quantized layer's (adaptune.quantized.QuantizedWeight): x·Wᵀ and W·Aᵀ then run through the layer.
Precision: the components' part runs in their parameters' dtype (float32 on a half-precision base),
and the sum is returned in the base's dtype, as PEFT does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..quantized import linear, row_norm_sq, times

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


def _plus_low_rank(y: Tensor, x: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """y + s·(x·Aᵀ)·Bᵀ (..., out) in the promoted dtype of y and A, x·Aᵀ in A's dtype; the sum as one multiply-add:
    no (..., out) temporaries for the product and its scaling, forward or backward."""
    dtype = torch.promote_types(y.dtype, A.dtype)
    h = F.linear(x.to(A.dtype), A).to(dtype)  # (..., r)
    out = torch.addmm(y.reshape(-1, y.shape[-1]).to(dtype), h.reshape(-1, h.shape[-1]), B.mT.to(dtype), alpha=scale)
    return out.reshape(y.shape)


def lora(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float,
         dropout: float = 0.0, training: bool = False) -> Tensor:
    """y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ — W is never combined with B·A."""
    y = linear(x, weight, bias)  # (..., out)
    return _plus_low_rank(y, _drop(x, dropout, training), A, B, scale).to(y.dtype)


def dora_norm(weight: Tensor, A: Tensor, B: Tensor, scale: float,
              weight_norm_sq: Tensor | None = None) -> Tensor:
    """Row norms n_i = ‖W_i + s·B_i·A‖ by the factored formula, without an (out, in) temporary.

    n² = ‖W_i‖² + 2s·(W·Aᵀ)_i·B_i + s²·B_i·(A·Aᵀ)·B_iᵀ, computed in float32 at least. A (r, in) and
    B (out, r) give n (out,); stacked per task, A (T, r, in) and B (T, out, r) give n (T, out); one weight per
    expert, W (E, out, in) with A (E, r, in) and B (E, out, r), gives n (E, out).
    """
    dtype = torch.promote_types(weight.dtype, torch.float32)
    A, B = A.to(dtype), B.to(dtype)
    if weight_norm_sq is None:
        weight_norm_sq = row_norm_sq(weight, dtype)  # (..., out); per expert (E, out), one expert at a time
    if isinstance(weight, Tensor) and weight.dim() == 3:  # per expert: one expert's weight in `dtype` at a time
        WA = torch.stack([w.to(dtype) @ a.mT for w, a in zip(weight, A)])  # (E, out, r)
    else:
        WA = times(weight.to(dtype) if isinstance(weight, Tensor) else weight, A).to(dtype)  # (..., out, r)
    AA = A @ A.mT  # (..., r, r)
    sq = weight_norm_sq.to(dtype) + 2 * scale * (WA * B).sum(-1) + scale**2 * ((B @ AA) * B).sum(-1)
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
    y = _plus_low_rank(linear(x, weight).to(dtype), _drop(x, dropout, training), A, B, scale)  # (..., out)
    y = (y * (magnitude / norm).to(dtype)).to(x.dtype)
    return y + bias if bias is not None else y


def bottleneck(x: Tensor, residual: Tensor, down_weight: Tensor, down_bias: Tensor | None,
               up_weight: Tensor, up_bias: Tensor | None, scale: float = 1.0,
               act: str = "relu") -> Tensor:
    """y = residual + s·up(act(down(x))). Serial placement: x is residual; parallel: x is the sublayer input."""
    h = ACTIVATIONS[act](F.linear(x.to(down_weight.dtype), down_weight, down_bias))  # (..., m)
    return (residual + scale * F.linear(h, up_weight, up_bias)).to(residual.dtype)  # (..., d)


# ---- routed ops: a task per sample ---------------------------------------------------------------
# x (N, ..., in) holds N samples; index (N,) gives each sample's task t in [0, T), or -1 for no update.
# Task tables are stacked on a leading T: A (T, r, in), B (T, out, r) with ranks zero-padded to one r,
# magnitude and norm (T, out), down (T, m, d_in), up (T, d, m); scale (T,); dropout one p per task.
# The reference loops over the tasks, each task's samples through the single-task math above.

def _task_rows(index: Tensor, t: int) -> Tensor:
    return (index == t).nonzero().squeeze(1)


def lora_routed(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: Tensor,
                index: Tensor, dropout: tuple[float, ...] = (), training: bool = False) -> Tensor:
    """y_n = x_n·Wᵀ + b + s_t·(drop(x_n)·A_tᵀ)·B_tᵀ with t = index[n]; index -1: y_n = x_n·Wᵀ + b."""
    y = linear(x, weight, bias)  # (N, ..., out)
    for t in range(A.shape[0]):
        rows = _task_rows(index, t)
        if rows.numel():
            xt = _drop(x.index_select(0, rows), dropout[t] if dropout else 0.0, training)
            low = F.linear(F.linear(xt.to(A.dtype), A[t]), B[t])  # (n, ..., out)
            y = y.index_copy(0, rows, (y.index_select(0, rows) + scale[t].item() * low).to(y.dtype))
    return y


def dora_routed(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, magnitude: Tensor,
                norm: Tensor, scale: Tensor, index: Tensor, dropout: tuple[float, ...] = (),
                training: bool = False) -> Tensor:
    """y_n = (m_t / n_t) ⊙ (x_n·Wᵀ + s_t·(drop(x_n)·A_tᵀ)·B_tᵀ) + b with t = index[n] and the task norms n
    given; index -1: y_n = x_n·Wᵀ + b."""
    dtype = torch.promote_types(x.dtype, A.dtype)
    y = linear(x, weight)  # (N, ..., out)
    for t in range(A.shape[0]):
        rows = _task_rows(index, t)
        if rows.numel():
            xt = _drop(x.index_select(0, rows), dropout[t] if dropout else 0.0, training)
            z = y.index_select(0, rows).to(dtype) + scale[t].item() * F.linear(F.linear(xt.to(A.dtype), A[t]),
                                                                               B[t]).to(dtype)
            y = y.index_copy(0, rows, (z * (magnitude[t] / norm[t]).to(dtype)).to(y.dtype))
    return y + bias if bias is not None else y


def bottleneck_routed(x: Tensor, residual: Tensor, down_weight: Tensor, down_bias: Tensor, up_weight: Tensor,
                      up_bias: Tensor, scale: Tensor, index: Tensor, act: str = "relu") -> Tensor:
    """y_n = residual_n + s_t·up_t(act(down_t(x_n))) with t = index[n]; index -1: y_n = residual_n."""
    y = residual
    for t in range(down_weight.shape[0]):
        rows = _task_rows(index, t)
        if rows.numel():
            y = y.index_copy(0, rows, bottleneck(x.index_select(0, rows), residual.index_select(0, rows),
                                                 down_weight[t], down_bias[t], up_weight[t], up_bias[t],
                                                 scale[t].item(), act))
    return y


# ---- grouped op: rows grouped by expert ------------------------------------------------------------
# x (S, in) holds S rows sorted by expert: expert e owns rows offsets[e-1]:offsets[e] (offsets (E,) the cumulative
# row counts, offsets[-1] = S). weight (E, out, in); A (E, r, in) and B (E, out, r), or one pair A (r, in),
# B (out, r) for every expert, or None (the base alone); row_scale (E, out) or None. The reference loops over
# the experts, each expert's rows through the single-expert math.

def grouped_lora(x: Tensor, offsets: Tensor, weight: Tensor, A: Tensor | None, B: Tensor | None, scale: float,
                 row_scale: Tensor | None = None, dropout: float = 0.0, training: bool = False) -> Tensor:
    """y = r_e ⊙ (x·W_eᵀ + s·(drop(x)·A_eᵀ)·B_eᵀ) on the rows of expert e (r_e = 1 without row_scale): (S, out)."""
    bounds = [0, *offsets.tolist()]
    pieces = []
    for e in range(weight.shape[0]):
        rows = x[bounds[e]:bounds[e + 1]]
        y = F.linear(rows, weight[e])  # (n, out)
        if A is not None:
            a, b = (A[e], B[e]) if A.dim() == 3 else (A, B)
            dtype = torch.promote_types(x.dtype, a.dtype)
            y = y.to(dtype) + scale * F.linear(F.linear(_drop(rows, dropout, training).to(a.dtype), a), b).to(dtype)
        if row_scale is not None:
            y = y * row_scale[e].to(y.dtype)
        pieces.append(y.to(x.dtype))
    return torch.cat(pieces)
