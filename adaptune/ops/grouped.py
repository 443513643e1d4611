"""grouped_lora by torch's grouped matrix multiply (torch.nn.functional.grouped_mm): each product of every
expert's rows in one call, where torch has the kernel for the operands; the math is `reference.grouped_lora`'s.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import _drop

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def supports(x: Tensor, weight: Tensor, A: Tensor | None, B: Tensor | None) -> bool:
    """Whether torch's grouped multiply takes these operands: one dtype for all (as the compiled kernels), rows of
    a multiple of 16 bytes (in, out and r), on CPU 16-byte aligned, on CUDA bfloat16 on compute capability 8.0 or
    newer; else the reference loop runs."""
    if _GROUPED_MM is None or any(t is not None and t.dtype != x.dtype for t in (weight, A, B)):
        return False
    sizes = (*weight.shape[-2:], *(() if A is None else A.shape[-2:-1]))
    if any(size * x.element_size() % 16 for size in sizes):
        return False
    if x.device.type == "cpu":
        return all(t.data_ptr() % 16 == 0 for t in (x, weight) if t.numel())
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    return False


def _gmm(x: Tensor, weight: Tensor, offsets: Tensor) -> Tensor:
    """Rows of expert e times W_eᵀ: x (S, in), weight (E, out, in) -> (S, out)."""
    return _GROUPED_MM(x, weight.mT, offs=offsets)


def grouped_lora(x: Tensor, offsets: Tensor, weight: Tensor, A: Tensor | None, B: Tensor | None, scale: float,
                 row_scale: Tensor | None = None, dropout: float = 0.0, training: bool = False) -> Tensor:
    """y = r_e ⊙ (x·W_eᵀ + s·(drop(x)·A_eᵀ)·Bᵀ_e) on the rows of expert e; see `reference.grouped_lora`."""
    offsets = offsets.to(torch.int32)
    y = _gmm(x, weight, offsets)  # (S, out)
    if A is not None:
        h = _drop(x, dropout, training)
        low = _gmm(_gmm(h, A, offsets), B, offsets) if A.dim() == 3 else F.linear(F.linear(h, A), B)
        y = y + scale * low
    if row_scale is not None:
        counts = torch.diff(offsets, prepend=offsets.new_zeros(1))
        experts = torch.repeat_interleave(torch.arange(weight.shape[0], device=x.device), counts, output_size=x.shape[0])
        y = y * row_scale.to(y.dtype)[experts]
    return y
