"""Python side of the compiled ops: fake (meta) functions and autograd for every op defined in
csrc/schema.cpp, and thin wrappers with the reference's signatures.

Dropout stays in Python: the wrapper draws drop(x) with `F.dropout`, exactly as the reference does,
and passes it to the op, so with the same RNG state kernel and reference see the same mask. The
kernels compute no gradient for the base weight and bias (they are frozen); the dispatcher in
`adaptune.ops` sends a trainable base to the reference.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

ops = torch.ops.adaptune
_registered = False


def _rows(x: Tensor):
    return math.prod(x.shape[:-1])


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _low_rank_grads_fake(xs, A, B, dropped, need_dx):
    dx = xs.new_empty(xs.shape) if need_dx else _empty(xs)
    dxd = xs.new_empty(xs.shape) if need_dx and dropped else _empty(xs)
    return dx, dxd, xs.new_empty(A.shape), xs.new_empty(B.shape)


def register() -> None:
    """Fake functions and autograd for every op; called once, after the library is loaded."""
    global _registered
    if _registered:
        return
    _registered = True
    lib = torch.library

    # ---- lora ----------------------------------------------------------------------------------
    @lib.register_fake("adaptune::lora")
    def _(x, weight, bias, A, B, scale, xd):
        return x.new_empty((*x.shape[:-1], weight.shape[0])), x.new_empty((_rows(x), A.shape[0]))

    @lib.register_fake("adaptune::lora_backward")
    def _(dy, xs, weight, A, B, h, scale, dropped, need_dx):
        return _low_rank_grads_fake(xs, A, B, dropped, need_dx)

    def lora_setup(ctx, inputs, output):
        x, weight, _, A, B, scale, xd = inputs
        ctx.scale, ctx.dropped = scale, xd is not None
        ctx.save_for_backward(xd if xd is not None else x, weight, A, B, output[1])

    def lora_backward(ctx, dy, _dh):
        xs, weight, A, B, h = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0] or ctx.needs_input_grad[6]
        dx, dxd, dA, dB = ops.lora_backward(dy, xs, weight, A, B, h, ctx.scale, ctx.dropped, need_dx)
        return (dx if need_dx else None), None, None, dA, dB, None, (dxd if ctx.dropped and need_dx else None)

    lib.register_autograd("adaptune::lora", lora_backward, setup_context=lora_setup)

    # ---- dora_norm -----------------------------------------------------------------------------
    @lib.register_fake("adaptune::dora_norm")
    def _(weight, A, B, scale, weight_norm_sq):
        dtype = torch.promote_types(weight.dtype, torch.float32)
        out, r = weight.shape[0], A.shape[0]
        return (weight.new_empty(out, dtype=dtype), weight.new_empty((out, r), dtype=dtype),
                weight.new_empty((out, r), dtype=dtype))

    @lib.register_fake("adaptune::dora_norm_backward")
    def _(dn, n, weight, A, B, WA, BAA, scale):
        return A.new_empty(A.shape), B.new_empty(B.shape)

    def norm_setup(ctx, inputs, output):
        weight, A, B, scale, _ = inputs
        ctx.scale = scale
        ctx.save_for_backward(output[0], weight, A, B, output[1], output[2])

    def norm_backward(ctx, dn, _dWA, _dBAA):
        n, weight, A, B, WA, BAA = ctx.saved_tensors
        dA, dB = ops.dora_norm_backward(dn, n, weight, A, B, WA, BAA, ctx.scale)
        return None, dA, dB, None, None

    lib.register_autograd("adaptune::dora_norm", norm_backward, setup_context=norm_setup)

    # ---- dora ----------------------------------------------------------------------------------
    @lib.register_fake("adaptune::dora")
    def _(x, weight, bias, A, B, magnitude, norm, scale, xd):
        out, n = weight.shape[0], _rows(x)
        return x.new_empty((*x.shape[:-1], out)), x.new_empty((n, A.shape[0])), x.new_empty((n, out))

    @lib.register_fake("adaptune::dora_backward")
    def _(dy, xs, weight, A, B, magnitude, norm, h, z, scale, dropped, need_dx, need_dnorm):
        dnorm = norm.new_empty(norm.shape) if need_dnorm else _empty(norm)
        return (*_low_rank_grads_fake(xs, A, B, dropped, need_dx), magnitude.new_empty(magnitude.shape), dnorm)

    def dora_setup(ctx, inputs, output):
        x, weight, _, A, B, magnitude, norm, scale, xd = inputs
        ctx.scale, ctx.dropped = scale, xd is not None
        ctx.save_for_backward(xd if xd is not None else x, weight, A, B, magnitude, norm, output[1], output[2])

    def dora_backward(ctx, dy, _dh, _dz):
        xs, weight, A, B, magnitude, norm, h, z = ctx.saved_tensors
        need_dx, need_dnorm = ctx.needs_input_grad[0] or ctx.needs_input_grad[8], ctx.needs_input_grad[6]
        dx, dxd, dA, dB, dm, dnorm = ops.dora_backward(dy, xs, weight, A, B, magnitude, norm, h, z, ctx.scale,
                                                       ctx.dropped, need_dx, need_dnorm)
        return ((dx if need_dx else None), None, None, dA, dB, dm, (dnorm if need_dnorm else None), None,
                (dxd if ctx.dropped and need_dx else None))

    lib.register_autograd("adaptune::dora", dora_backward, setup_context=dora_setup)

    # ---- bottleneck ----------------------------------------------------------------------------
    @lib.register_fake("adaptune::bottleneck")
    def _(x, residual, down_weight, down_bias, up_weight, up_bias, scale, act):
        hidden = (_rows(x), down_weight.shape[0])
        return residual.new_empty(residual.shape), x.new_empty(hidden), x.new_empty(hidden)

    @lib.register_fake("adaptune::bottleneck_backward")
    def _(dy, x, pre, h, down_weight, up_weight, scale, act, need_dx):
        m, d = down_weight.shape[0], up_weight.shape[0]
        dx = x.new_empty(x.shape) if need_dx else _empty(x)
        return dx, x.new_empty(down_weight.shape), x.new_empty(m), x.new_empty(up_weight.shape), x.new_empty(d)

    def bottleneck_setup(ctx, inputs, output):
        x, _, down_weight, down_bias, up_weight, up_bias, scale, act = inputs
        ctx.scale, ctx.act, ctx.biases = scale, act, (down_bias is not None, up_bias is not None)
        ctx.save_for_backward(x, output[1], output[2], down_weight, up_weight)

    def bottleneck_backward(ctx, dy, _dpre, _dh):
        x, pre, h, down_weight, up_weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dWd, dbd, dWu, dbu = ops.bottleneck_backward(dy, x, pre, h, down_weight, up_weight, ctx.scale, ctx.act,
                                                         need[0])
        return ((dx if need[0] else None), (dy if need[1] else None), dWd, (dbd if ctx.biases[0] else None), dWu,
                (dbu if ctx.biases[1] else None), None, None)

    lib.register_autograd("adaptune::bottleneck", bottleneck_backward, setup_context=bottleneck_setup)


# ---- wrappers with the reference's signatures ----------------------------------------------------

def _dropped(x: Tensor, p: float, training: bool) -> Tensor | None:
    return F.dropout(x, p, True) if p > 0.0 and training else None


def lora(x, weight, bias, A, B, scale, dropout=0.0, training=False):
    return ops.lora(x, weight, bias, A, B, float(scale), _dropped(x, dropout, training))[0]


def dora_norm(weight, A, B, scale, weight_norm_sq=None):
    return ops.dora_norm(weight, A, B, float(scale), weight_norm_sq)[0]


def dora(x, weight, bias, A, B, magnitude, scale, dropout=0.0, training=False, weight_norm_sq=None,
         detach_norm=True):
    if detach_norm:
        with torch.no_grad():
            norm = dora_norm(weight, A, B, scale, weight_norm_sq)
    else:
        norm = dora_norm(weight, A, B, scale, weight_norm_sq)
    xd = _dropped(x, dropout, training)
    return ops.dora(x, weight, bias, A, B, magnitude, norm, float(scale), xd)[0]


def bottleneck(x, residual, down_weight, down_bias, up_weight, up_bias, scale=1.0, act="relu"):
    return ops.bottleneck(x, residual, down_weight, down_bias, up_weight, up_bias, float(scale), act)[0]
