"""The compiled ops of csrc/ (schemas in csrc/schema.cpp): a typed wrapper per op with the
reference's signature, and each op's `register_fake` and `register_autograd`, at module level.

Import this module only after the library is loaded (`adaptune.ops.builds()` does both): the
registrations below need the schemas. Dropout stays in Python: the wrapper draws drop(x) with
`F.dropout`, as the reference does, and passes it to the op, so under the same RNG state kernel and
reference use the same mask. The kernels compute no gradient for the (frozen) base weight and bias;
`adaptune.ops` sends a trainable base to the reference.

Each fake checks its inputs' shapes with `torch._check`, with the message of the kernel's TORCH_CHECK
(csrc/ops.h, csrc/routed.h), so a wrong shape under torch.compile or opcheck fails as the kernel does
rather than giving a wrong-shaped fake.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

if not hasattr(torch.ops.adaptune, "lora"):
    raise ImportError("adaptune.ops.kernels needs the compiled adaptune library: call adaptune.ops.builds() first")

ops = torch.ops.adaptune
Grads = tuple[Tensor | None, ...]


def _rows(x: Tensor) -> int:
    return math.prod(x.shape[:-1])


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _dropped(x: Tensor, p: float, training: bool) -> Tensor | None:
    return F.dropout(x, p, True) if p > 0.0 and training else None


# ---- shape checks of the fakes: the kernels' TORCH_CHECKs -----------------------------------------------
# Each condition is its own torch._check (under symbolic shapes, `and` would guard on the first one), and
# dimensions are checked before the sizes that index them. The messages are built at trace time only.

def _check(message: str, *conditions) -> None:
    for condition in conditions:
        torch._check(condition, lambda: message)


def _sizes(**tensors: Tensor) -> str:
    return ", ".join(f"{name} {list(t.shape)}" for name, t in tensors.items())


def _check_same_shape(t: Tensor, like: Tensor, message: str) -> None:
    _check(message, t.dim() == like.dim())
    _check(message, *(a == b for a, b in zip(t.shape, like.shape)))


def _check_low_rank(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor) -> None:
    """x (..., in), weight (out, in), A (r, in), B (out, r), bias (out,): csrc/ops.h check_low_rank."""
    shapes = _sizes(x=x, weight=weight, A=A, B=B)
    _check("adaptune: x (..., in), weight (out, in), A (r, in), B (out, r) expected; got " + shapes,
           x.dim() >= 1, weight.dim() == 2, A.dim() == 2, B.dim() == 2)
    _check("adaptune: shape mismatch: " + shapes, x.shape[-1] == weight.shape[1], A.shape[1] == weight.shape[1],
           B.shape[0] == weight.shape[0], B.shape[1] == A.shape[0])
    if bias is not None:
        _check(f"adaptune: bias must be ({weight.shape[0]},)", bias.dim() == 1)
        _check(f"adaptune: bias must be ({weight.shape[0]},)", bias.shape[0] == weight.shape[0])


def _check_xd(x: Tensor, xd: Tensor | None) -> None:
    if xd is not None:
        _check_same_shape(xd, x, "adaptune: xd must have x's shape")


def _check_norm_tasks(weight: Tensor, A: Tensor, B: Tensor) -> None:
    """A (r, in) and B (out, r), or stacked per task (T, r, in) and (T, out, r): csrc/ops.h norm_tasks."""
    message = (f"adaptune: dora_norm shapes: weight {list(weight.shape)}, A (r, in) or (T, r, in) {list(A.shape)}, "
               f"B (out, r) or (T, out, r) {list(B.shape)}")
    _check(message, weight.dim() == 2, A.dim() in (2, 3), B.dim() == A.dim())
    if A.dim() == 3:
        _check(message, A.shape[0] == B.shape[0])
    _check(message, A.shape[-1] == weight.shape[1], B.shape[-2] == weight.shape[0], B.shape[-1] == A.shape[-2])


def _check_tables(x: Tensor, weight: Tensor, A: Tensor, B: Tensor, scale: Tensor, index: Tensor) -> None:
    """index (N,), scale (T,), A (T, r, in), B (T, out, r), x (N, ..., in): csrc/routed.h gather, check_tables
    and samples."""
    _check_route(index, scale)
    message = (f"adaptune: routed shapes: {_sizes(x=x, weight=weight)}, A (T, r, in) {list(A.shape)}, "
               f"B (T, out, r) {list(B.shape)}, scale (T,) {list(scale.shape)}")
    _check(message, x.dim() >= 1, weight.dim() == 2, A.dim() == 3, B.dim() == 3)
    _check(message, A.shape[0] == B.shape[0], A.shape[0] == scale.shape[0], A.shape[2] == weight.shape[1],
           B.shape[1] == weight.shape[0], B.shape[2] == A.shape[1], x.shape[-1] == weight.shape[1])
    _check_samples(x, index)


def _check_route(index: Tensor, scale: Tensor) -> None:
    _check("adaptune: index (N,) and scale (T,) expected; got " + _sizes(index=index, scale=scale),
           index.dim() == 1, scale.dim() == 1)


def _check_samples(x: Tensor, index: Tensor) -> None:
    n = index.shape[0]
    message = f"adaptune: x must have the route's {n} samples first; got {list(x.shape)}"
    _check(message, x.dim() >= 1)
    _check(message, x.shape[0] == n)


def _low_rank_grads_fake(xs: Tensor, A: Tensor, B: Tensor, dropped: bool,
                         need_dx: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dx = xs.new_empty(xs.shape) if need_dx else _empty(xs)
    dxd = xs.new_empty(xs.shape) if need_dx and dropped else _empty(xs)
    return dx, dxd, xs.new_empty(A.shape), xs.new_empty(B.shape)


# ---- lora: y = x·Wᵀ + b + s·(xd·Aᵀ)·Bᵀ, xd = drop(x) ------------------------------------------------

def lora(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float,
         dropout: float = 0.0, training: bool = False) -> Tensor:
    """y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ; see `reference.lora`."""
    return ops.lora(x, weight, bias, A, B, float(scale), _dropped(x, dropout, training))[0]


@torch.library.register_fake("adaptune::lora")
def _(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float,
      xd: Tensor | None) -> tuple[Tensor, Tensor]:
    _check_low_rank(x, weight, bias, A, B)
    _check_xd(x, xd)
    return x.new_empty((*x.shape[:-1], weight.shape[0])), x.new_empty((_rows(x), A.shape[0]))  # y, h (N, r)


@torch.library.register_fake("adaptune::lora_backward")
def _(dy: Tensor, xs: Tensor, weight: Tensor, A: Tensor, B: Tensor, h: Tensor, scale: float, dropped: bool,
      need_dx: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_low_rank(xs, weight, None, A, B)
    return _low_rank_grads_fake(xs, A, B, dropped, need_dx)


def _lora_setup(ctx, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
    x, weight, _, A, B, scale, xd = inputs
    ctx.scale, ctx.dropped = scale, xd is not None
    ctx.save_for_backward(xd if xd is not None else x, weight, A, B, output[1])


def _lora_backward(ctx, dy: Tensor, _dh: Tensor) -> Grads:
    xs, weight, A, B, h = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0] or ctx.needs_input_grad[6]
    dx, dxd, dA, dB = ops.lora_backward(dy, xs, weight, A, B, h, ctx.scale, ctx.dropped, need_dx)
    return (dx if need_dx else None), None, None, dA, dB, None, (dxd if ctx.dropped and need_dx else None)


torch.library.register_autograd("adaptune::lora", _lora_backward, setup_context=_lora_setup)


# ---- dora_norm: n_i = ‖W_i + s·B_i·A‖, factored (no out×in temporary) -------------------------------

def dora_norm(weight: Tensor, A: Tensor, B: Tensor, scale: float, weight_norm_sq: Tensor | None = None) -> Tensor:
    """n_i = ‖W_i + s·B_i·A‖ by the factored formula; see `reference.dora_norm`."""
    return ops.dora_norm(weight, A, B, float(scale), weight_norm_sq)[0]


@torch.library.register_fake("adaptune::dora_norm")
def _(weight: Tensor, A: Tensor, B: Tensor, scale: float,
      weight_norm_sq: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    _check_norm_tasks(weight, A, B)
    if weight_norm_sq is not None:
        message = f"adaptune: weight_norm_sq must be ({weight.shape[0]},)"
        _check(message, weight_norm_sq.dim() == 1)
        _check(message, weight_norm_sq.shape[0] == weight.shape[0])
    dtype = torch.promote_types(weight.dtype, torch.float32)
    return (weight.new_empty(B.shape[:-1], dtype=dtype), weight.new_empty(B.shape, dtype=dtype),  # n, W·Aᵀ
            weight.new_empty(B.shape, dtype=dtype))  # B·A·Aᵀ


@torch.library.register_fake("adaptune::dora_norm_backward")
def _(dn: Tensor, n: Tensor, weight: Tensor, A: Tensor, B: Tensor, WA: Tensor, BAA: Tensor,
      scale: float) -> tuple[Tensor, Tensor]:
    _check_norm_tasks(weight, A, B)
    return A.new_empty(A.shape), B.new_empty(B.shape)


def _dora_norm_setup(ctx, inputs: tuple, output: tuple[Tensor, Tensor, Tensor]) -> None:
    weight, A, B, scale, _ = inputs
    ctx.scale = scale
    ctx.save_for_backward(output[0], weight, A, B, output[1], output[2])


def _dora_norm_backward(ctx, dn: Tensor, _dWA: Tensor, _dBAA: Tensor) -> Grads:
    n, weight, A, B, WA, BAA = ctx.saved_tensors
    dA, dB = ops.dora_norm_backward(dn, n, weight, A, B, WA, BAA, ctx.scale)
    return None, dA, dB, None, None


torch.library.register_autograd("adaptune::dora_norm", _dora_norm_backward, setup_context=_dora_norm_setup)


# ---- dora: y = (m / n) ⊙ z + b, z = x·Wᵀ + s·(xd·Aᵀ)·Bᵀ ---------------------------------------------

def dora(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, magnitude: Tensor, scale: float,
         dropout: float = 0.0, training: bool = False, weight_norm_sq: Tensor | None = None,
         detach_norm: bool = True) -> Tensor:
    """y = (m / n) ⊙ (x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ) + b; see `reference.dora`."""
    if detach_norm:
        with torch.no_grad():
            norm = dora_norm(weight, A, B, scale, weight_norm_sq)
    else:
        norm = dora_norm(weight, A, B, scale, weight_norm_sq)
    xd = _dropped(x, dropout, training)
    return ops.dora(x, weight, bias, A, B, magnitude, norm, float(scale), xd)[0]


@torch.library.register_fake("adaptune::dora")
def _(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, magnitude: Tensor, norm: Tensor,
      scale: float, xd: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    _check_low_rank(x, weight, bias, A, B)
    message = f"adaptune: magnitude and norm must be ({weight.shape[0]},)"
    _check(message, magnitude.dim() == 1, norm.dim() == 1)
    _check(message, magnitude.shape[0] == weight.shape[0], norm.shape[0] == weight.shape[0])
    _check_xd(x, xd)
    out, n = weight.shape[0], _rows(x)
    return x.new_empty((*x.shape[:-1], out)), x.new_empty((n, A.shape[0])), x.new_empty((n, out))  # y, h, z


@torch.library.register_fake("adaptune::dora_backward")
def _(dy: Tensor, xs: Tensor, weight: Tensor, A: Tensor, B: Tensor, magnitude: Tensor, norm: Tensor, h: Tensor,
      z: Tensor, scale: float, dropped: bool, need_dx: bool, need_dnorm: bool) -> tuple[Tensor, ...]:
    _check_low_rank(xs, weight, None, A, B)
    dnorm = norm.new_empty(norm.shape) if need_dnorm else _empty(norm)
    return (*_low_rank_grads_fake(xs, A, B, dropped, need_dx), magnitude.new_empty(magnitude.shape), dnorm)


def _dora_setup(ctx, inputs: tuple, output: tuple[Tensor, Tensor, Tensor]) -> None:
    x, weight, _, A, B, magnitude, norm, scale, xd = inputs
    ctx.scale, ctx.dropped = scale, xd is not None
    ctx.save_for_backward(xd if xd is not None else x, weight, A, B, magnitude, norm, output[1], output[2])


def _dora_backward(ctx, dy: Tensor, _dh: Tensor, _dz: Tensor) -> Grads:
    xs, weight, A, B, magnitude, norm, h, z = ctx.saved_tensors
    need_dx, need_dnorm = ctx.needs_input_grad[0] or ctx.needs_input_grad[8], ctx.needs_input_grad[6]
    dx, dxd, dA, dB, dm, dnorm = ops.dora_backward(dy, xs, weight, A, B, magnitude, norm, h, z, ctx.scale,
                                                   ctx.dropped, need_dx, need_dnorm)
    return ((dx if need_dx else None), None, None, dA, dB, dm, (dnorm if need_dnorm else None), None,
            (dxd if ctx.dropped and need_dx else None))


torch.library.register_autograd("adaptune::dora", _dora_backward, setup_context=_dora_setup)


# ---- bottleneck: y = residual + s·up(act(down(x))) --------------------------------------------------

def bottleneck(x: Tensor, residual: Tensor, down_weight: Tensor, down_bias: Tensor | None, up_weight: Tensor,
               up_bias: Tensor | None, scale: float = 1.0, act: str = "relu") -> Tensor:
    """y = residual + s·up(act(down(x))); see `reference.bottleneck`."""
    return ops.bottleneck(x, residual, down_weight, down_bias, up_weight, up_bias, float(scale), act)[0]


@torch.library.register_fake("adaptune::bottleneck")
def _(x: Tensor, residual: Tensor, down_weight: Tensor, down_bias: Tensor | None, up_weight: Tensor,
      up_bias: Tensor | None, scale: float, act: str) -> tuple[Tensor, Tensor, Tensor]:
    message = "adaptune: bottleneck shapes: " + _sizes(x=x, residual=residual, down=down_weight, up=up_weight)
    _check(message, down_weight.dim() == 2, up_weight.dim() == 2, x.dim() >= 1, residual.dim() >= 1)
    _check(message, down_weight.shape[1] == x.shape[-1], up_weight.shape[1] == down_weight.shape[0],
           up_weight.shape[0] == residual.shape[-1], _rows(x) == _rows(residual))
    hidden = (_rows(x), down_weight.shape[0])  # (N, m)
    return residual.new_empty(residual.shape), x.new_empty(hidden), x.new_empty(hidden)  # y, pre, h


@torch.library.register_fake("adaptune::bottleneck_backward")
def _(dy: Tensor, x: Tensor, pre: Tensor, h: Tensor, down_weight: Tensor, up_weight: Tensor, scale: float,
      act: str, need_dx: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    m, d = down_weight.shape[0], up_weight.shape[0]
    dx = x.new_empty(x.shape) if need_dx else _empty(x)
    return dx, x.new_empty(down_weight.shape), x.new_empty(m), x.new_empty(up_weight.shape), x.new_empty(d)


def _bottleneck_setup(ctx, inputs: tuple, output: tuple[Tensor, Tensor, Tensor]) -> None:
    x, _, down_weight, down_bias, up_weight, up_bias, scale, act = inputs
    ctx.scale, ctx.act, ctx.biases = scale, act, (down_bias is not None, up_bias is not None)
    ctx.save_for_backward(x, output[1], output[2], down_weight, up_weight)


def _bottleneck_backward(ctx, dy: Tensor, _dpre: Tensor, _dh: Tensor) -> Grads:
    x, pre, h, down_weight, up_weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dWd, dbd, dWu, dbu = ops.bottleneck_backward(dy, x, pre, h, down_weight, up_weight, ctx.scale, ctx.act,
                                                     need[0])
    return ((dx if need[0] else None), (dy if need[1] else None), dWd, (dbd if ctx.biases[0] else None), dWu,
            (dbu if ctx.biases[1] else None), None, None)


torch.library.register_autograd("adaptune::bottleneck", _bottleneck_backward, setup_context=_bottleneck_setup)


# ---- routed: a task per sample (x (N, ..., in), index (N,), task tables stacked on T) ------------------

def _routed_dropped(x: Tensor, index: Tensor, dropout: tuple[float, ...], training: bool) -> Tensor | None:
    """drop(x) with each sample's task's p (None when no task drops): the same distribution as the reference's
    per-task F.dropout, not the same mask."""
    if not training or not any(p > 0.0 for p in dropout):
        return None
    p = torch.tensor([*dropout, 0.0], device=x.device, dtype=x.dtype)[index]  # index -1 -> 0
    keep = (1 - p).view(-1, *[1] * (x.dim() - 1))
    return x * torch.bernoulli(keep.expand_as(x)) / keep


def lora_routed(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: Tensor, index: Tensor,
                dropout: tuple[float, ...] = (), training: bool = False) -> Tensor:
    """LoRA with a task per sample; see `reference.lora_routed`."""
    return ops.lora_routed(x, weight, bias, A, B, scale, index, _routed_dropped(x, index, dropout, training))[0]


@torch.library.register_fake("adaptune::lora_routed")
def _(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: Tensor, index: Tensor,
      xd: Tensor | None) -> tuple[Tensor, Tensor]:
    _check_tables(x, weight, A, B, scale, index)
    _check_xd(x, xd)
    n = index.shape[0]
    return x.new_empty((*x.shape[:-1], weight.shape[0])), x.new_empty((n, _rows(x) // n, A.shape[1]))  # y, h


@torch.library.register_fake("adaptune::lora_routed_backward")
def _(dy: Tensor, xs: Tensor, weight: Tensor, A: Tensor, B: Tensor, scale: Tensor, index: Tensor, h: Tensor,
      dropped: bool, need_dx: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_tables(xs, weight, A, B, scale, index)
    return _low_rank_grads_fake(xs, A, B, dropped, need_dx)


def _lora_routed_setup(ctx, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
    x, weight, _, A, B, scale, index, xd = inputs
    ctx.dropped = xd is not None
    ctx.save_for_backward(xd if xd is not None else x, weight, A, B, scale, index, output[1])


def _lora_routed_backward(ctx, dy: Tensor, _dh: Tensor) -> Grads:
    xs, weight, A, B, scale, index, h = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0] or ctx.needs_input_grad[7]
    dx, dxd, dA, dB = ops.lora_routed_backward(dy, xs, weight, A, B, scale, index, h, ctx.dropped, need_dx)
    return (dx if need_dx else None), None, None, dA, dB, None, None, (dxd if ctx.dropped and need_dx else None)


torch.library.register_autograd("adaptune::lora_routed", _lora_routed_backward, setup_context=_lora_routed_setup)


def dora_routed(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, magnitude: Tensor, norm: Tensor,
                scale: Tensor, index: Tensor, dropout: tuple[float, ...] = (), training: bool = False) -> Tensor:
    """DoRA with a task per sample; see `reference.dora_routed`."""
    xd = _routed_dropped(x, index, dropout, training)
    return ops.dora_routed(x, weight, bias, A, B, magnitude, norm, scale, index, xd)[0]


@torch.library.register_fake("adaptune::dora_routed")
def _(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, magnitude: Tensor, norm: Tensor,
      scale: Tensor, index: Tensor, xd: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    _check_tables(x, weight, A, B, scale, index)
    message = f"adaptune: magnitude and norm must be (T, out) = ({A.shape[0]}, {weight.shape[0]})"
    _check(message, magnitude.dim() == 2, norm.dim() == 2)
    _check(message, magnitude.shape[0] == A.shape[0], magnitude.shape[1] == weight.shape[0],
           norm.shape[0] == A.shape[0], norm.shape[1] == weight.shape[0])
    _check_xd(x, xd)
    n, out = index.shape[0], weight.shape[0]
    rows = _rows(x) // n
    return x.new_empty((*x.shape[:-1], out)), x.new_empty((n, rows, A.shape[1])), x.new_empty((n, rows, out))


@torch.library.register_fake("adaptune::dora_routed_backward")
def _(dy: Tensor, xs: Tensor, weight: Tensor, A: Tensor, B: Tensor, magnitude: Tensor, norm: Tensor, scale: Tensor,
      index: Tensor, h: Tensor, z: Tensor, dropped: bool, need_dx: bool, need_dnorm: bool) -> tuple[Tensor, ...]:
    _check_tables(xs, weight, A, B, scale, index)
    dnorm = norm.new_empty(norm.shape) if need_dnorm else _empty(norm)
    return (*_low_rank_grads_fake(xs, A, B, dropped, need_dx), magnitude.new_empty(magnitude.shape), dnorm)


def _dora_routed_setup(ctx, inputs: tuple, output: tuple[Tensor, Tensor, Tensor]) -> None:
    x, weight, _, A, B, magnitude, norm, scale, index, xd = inputs
    ctx.dropped = xd is not None
    ctx.save_for_backward(xd if xd is not None else x, weight, A, B, magnitude, norm, scale, index, output[1],
                          output[2])


def _dora_routed_backward(ctx, dy: Tensor, _dh: Tensor, _dz: Tensor) -> Grads:
    xs, weight, A, B, magnitude, norm, scale, index, h, z = ctx.saved_tensors
    need_dx, need_dnorm = ctx.needs_input_grad[0] or ctx.needs_input_grad[9], ctx.needs_input_grad[6]
    dx, dxd, dA, dB, dm, dnorm = ops.dora_routed_backward(dy, xs, weight, A, B, magnitude, norm, scale, index, h, z,
                                                          ctx.dropped, need_dx, need_dnorm)
    return ((dx if need_dx else None), None, None, dA, dB, dm, (dnorm if need_dnorm else None), None, None,
            (dxd if ctx.dropped and need_dx else None))


torch.library.register_autograd("adaptune::dora_routed", _dora_routed_backward, setup_context=_dora_routed_setup)


def bottleneck_routed(x: Tensor, residual: Tensor, down_weight: Tensor, down_bias: Tensor, up_weight: Tensor,
                      up_bias: Tensor, scale: Tensor, index: Tensor, act: str = "relu") -> Tensor:
    """Bottleneck adapters with a task per sample; see `reference.bottleneck_routed`."""
    return ops.bottleneck_routed(x, residual, down_weight, down_bias, up_weight, up_bias, scale, index, act)[0]


@torch.library.register_fake("adaptune::bottleneck_routed")
def _(x: Tensor, residual: Tensor, down_weight: Tensor, down_bias: Tensor, up_weight: Tensor, up_bias: Tensor,
      scale: Tensor, index: Tensor, act: str) -> tuple[Tensor, Tensor, Tensor]:
    _check_route(index, scale)
    message = (f"adaptune: routed bottleneck shapes: {_sizes(x=x, residual=residual)}, "
               f"down (T, m, d) {list(down_weight.shape)}, up (T, d, m) {list(up_weight.shape)}")
    _check(message, x.dim() >= 1, residual.dim() >= 1, down_weight.dim() == 3, up_weight.dim() == 3,
           down_bias.dim() == 2, up_bias.dim() == 2)
    _check(message, down_weight.shape[2] == x.shape[-1], up_weight.shape[2] == down_weight.shape[1],
           up_weight.shape[1] == residual.shape[-1], down_bias.shape[1] == down_weight.shape[1],
           up_bias.shape[1] == up_weight.shape[1], scale.shape[0] == down_weight.shape[0])
    _check_samples(x, index)
    _check_samples(residual, index)
    _check("adaptune: x and residual must have the same rows", _rows(x) == _rows(residual))
    n = index.shape[0]
    hidden = (n, _rows(x) // n, down_weight.shape[1])  # (N, L, m)
    return residual.new_empty(residual.shape), x.new_empty(hidden), x.new_empty(hidden)  # y, pre, h


@torch.library.register_fake("adaptune::bottleneck_routed_backward")
def _(dy: Tensor, x: Tensor, pre: Tensor, h: Tensor, down_weight: Tensor, up_weight: Tensor, scale: Tensor,
      index: Tensor, act: str, need_dx: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    _check_route(index, scale)
    _check_samples(x, index)
    dx = x.new_empty(x.shape) if need_dx else _empty(x)
    return (dx, x.new_empty(down_weight.shape), x.new_empty(down_weight.shape[:2]), x.new_empty(up_weight.shape),
            x.new_empty(up_weight.shape[:2]))


def _bottleneck_routed_setup(ctx, inputs: tuple, output: tuple[Tensor, Tensor, Tensor]) -> None:
    x, _, down_weight, _, up_weight, _, scale, index, act = inputs
    ctx.act = act
    ctx.save_for_backward(x, output[1], output[2], down_weight, up_weight, scale, index)


def _bottleneck_routed_backward(ctx, dy: Tensor, _dpre: Tensor, _dh: Tensor) -> Grads:
    x, pre, h, down_weight, up_weight, scale, index = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dWd, dbd, dWu, dbu = ops.bottleneck_routed_backward(dy, x, pre, h, down_weight, up_weight, scale, index,
                                                            ctx.act, need[0])
    return (dx if need[0] else None), (dy if need[1] else None), dWd, dbd, dWu, dbu, None, None, None


torch.library.register_autograd("adaptune::bottleneck_routed", _bottleneck_routed_backward,
                                setup_context=_bottleneck_routed_setup)
