"""The op functions adaptune's components call. One dispatch point for every op.

| op         | math                                                          |
|------------|---------------------------------------------------------------|
| lora       | y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ                              |
| dora       | y = (m / n) ⊙ (x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ) + b, n = ‖W + s·B·A‖ rows |
| dora_norm  | n by the factored formula (no out×in temporary); stacked tasks: A (T, r, in) -> n (T, out) |
| bottleneck | y = residual + s·up(act(down(x)))                              |
| lora_routed, dora_routed, bottleneck_routed | the same with a task per sample: x (N, ...), index (N,) |
| grouped_lora | rows grouped by expert (a mixture of experts): y = r_e ⊙ (x·W_eᵀ + s·(drop(x)·A_eᵀ)·B_eᵀ) |

Each op runs the compiled kernel (csrc/, built on first use, see `build.py`) when it is built for
the tensor's device, else its pure-PyTorch reference (`adaptune.ops.reference`), which is also the
oracle kernels are tested against. `ADAPTUNE_KERNELS` or `use_kernels()` picks the mode:
`auto` (kernel if it builds, else the reference after one warning with the compiler's reason),
`off` (always the reference), `require` (kernel or an `AdaptuneError`). A trainable base weight
or bias always runs the reference: the kernels compute no gradient for them. So does a call under
`torch.autocast`, and so do components whose dtype differs from the input's (float32 components on a
half-precision base): the kernels take operands of one dtype. So does a quantized base (its weight is a
`adaptune.quantized.QuantizedWeight`, whose products run through the layer), whatever the mode.
"""
from __future__ import annotations

import functools
import inspect
import os
import warnings
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..errors import AdaptuneError, ConfigError
from . import grouped, reference
from .reference import ACTIVATIONS

if TYPE_CHECKING:
    from .build import Build

MODES = ("auto", "off", "require")
OPS = ("lora", "dora", "dora_norm", "bottleneck", "lora_routed", "dora_routed", "bottleneck_routed", "grouped_lora")
_mode = os.environ.get("ADAPTUNE_KERNELS", "auto").strip().lower() or "auto"
_builds = None  # device type -> build.Build, after the one build attempt
_warned: set[str] = set()


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ConfigError(f"kernel mode {mode!r} is not valid (from ADAPTUNE_KERNELS or use_kernels); "
                          f"valid: {', '.join(MODES)}")
    return mode


class use_kernels:
    """`use_kernels("off"|"auto"|"require")` sets the mode; as a context manager it restores the previous one."""

    def __init__(self, mode: str) -> None:
        global _mode
        self.previous, _mode = _mode, _check_mode(mode)

    def __enter__(self) -> "use_kernels":
        return self

    def __exit__(self, *exc) -> None:
        global _mode
        _mode = self.previous


def mode() -> str:
    return _check_mode(_mode)


def _warn_once(key: str, message: str) -> None:
    if key not in _warned and not torch.compiler.is_compiling():
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def builds() -> dict[str, Build]:
    """Build (or load the cached build of) the extension once per process; {device type: Build}."""
    global _builds
    if _builds is None:
        from . import build

        results = build.build_all()
        if any(b.ok for b in results.values()):
            from . import kernels  # noqa: F401 — importing it registers the fakes and autograd
        _builds = results
    return _builds


@torch.compiler.assume_constant_result
def _kernel_ready(device: str) -> bool:
    """Whether the kernel runs for a device type in the current mode (the build happens here, once)."""
    current = mode()
    if current == "off":
        return False
    if device not in ("cpu", "cuda"):
        if current == "require":
            raise AdaptuneError(f"ADAPTUNE_KERNELS=require: adaptune has no kernels for device type {device!r}")
        return False
    result = builds()[device]
    if not result.ok and current == "require":
        raise AdaptuneError(f"ADAPTUNE_KERNELS=require but the adaptune extension is not available on {device}: "
                            f"{result.reason}")
    if not result.ok:
        _warn_once(f"build:{device}", f"adaptune: the {device} kernels are not available, running the pure-PyTorch "
                   f"reference ops (set ADAPTUNE_KERNELS=off to silence this): {result.reason}")
    return result.ok


def _use_kernel(op: str, x: Tensor, frozen: list[Tensor | None], same_dtype: list[Tensor | None]) -> bool:
    """The dispatch rule of every op: the kernel if it runs on x's device in this mode, every `same_dtype`
    tensor has x's dtype, no `frozen` one requires grad, and autocast is off; else the reference. A quantized
    base weight (not a tensor: adaptune.quantized) always runs the reference, whatever the mode."""
    if any(t is not None and not isinstance(t, Tensor) for t in (x, *frozen)):
        return False
    if not _kernel_ready(x.device.type):
        return False
    if any(t is not None and t.dtype != x.dtype for t in same_dtype):
        return False  # mixed precision (float32 components, half base): the reference
    if any(t is not None and t.requires_grad for t in frozen):
        _warn_once(f"trainable:{op}", f"adaptune: {op} on a trainable base weight or bias runs the reference "
                   "(the kernels compute no gradient for the frozen base)")
        return False
    if torch.is_autocast_enabled(x.device.type):
        # inside a kernel, autocast would recast some GEMMs and not others: the reference autocasts as usual
        _warn_once(f"autocast:{op}", f"adaptune: {op} under torch.autocast runs the reference (the kernels take "
                   "operands of one dtype; cast the model instead to use them)")
        return False
    return True


def path(op: str, device: str) -> tuple[str, str]:
    """("kernel" | "reference", why) for an op on a device type, as `adaptune info` prints it."""
    if op not in OPS:
        raise ConfigError(f"unknown op {op!r}; valid: {', '.join(OPS)}")
    current = mode()
    if current == "off":
        return "reference", "kernels off (ADAPTUNE_KERNELS=off or use_kernels('off'))"
    if op == "grouped_lora":
        if grouped._GROUPED_MM is None:
            return "reference", f"torch {torch.__version__} has no grouped matrix multiply"
        return "kernel", ("torch's grouped matrix multiply where it takes the operands (one dtype; CUDA: bfloat16, "
                          "compute capability 8.0+), else the reference")
    if device not in ("cpu", "cuda"):
        return "reference", f"no kernels for device type {device!r}"
    result = builds()[device]
    if result.ok:
        return "kernel", f"compiled extension ({current} mode), {result.reason}"
    return "reference", f"kernels not available: {result.reason.splitlines()[0]}"


def _op(like: str = "x", frozen: tuple[str, ...] = (), same_dtype: tuple[str, ...] = (),
        ndim: dict[str, int] | None = None):
    """Turns a signature (a def with a docstring and no body) into the op of that name: a call runs
    `kernels.<name>` when `_use_kernel` allows it, else `reference.<name>`, with the same arguments.

    like: the argument whose device picks the kernels and whose dtype the others must have;
    frozen: the base weight and bias, which must not require grad (the kernels compute no gradient for them);
    same_dtype: the components, which must have `like`'s dtype (the kernels take operands of one dtype);
    ndim: {argument: the number of dimensions the kernel takes}, other shapes running the reference.
    All of them name parameters without a default.
    """
    def wrap(signature):
        op = signature.__name__
        assert op in OPS, f"{op} is missing from OPS"
        params = inspect.signature(signature).parameters
        shapes = ndim or {}
        position = {name: list(params).index(name) for name in (like, *frozen, *same_dtype, *shapes)}
        assert all(params[name].default is inspect.Parameter.empty for name in position), op

        def arg(args: tuple, kwargs: dict, name: str):
            if position[name] < len(args):
                return args[position[name]]
            if name not in kwargs:
                raise TypeError(f"{op}() missing required argument: {name!r}")
            return kwargs[name]

        @functools.wraps(signature)
        def dispatch(*args, **kwargs) -> Tensor:
            shaped = all(not isinstance(t := arg(args, kwargs, name), Tensor) or t.dim() == n
                         for name, n in shapes.items())  # not a tensor (a quantized weight): _use_kernel says no
            if shaped and _use_kernel(op, arg(args, kwargs, like), [arg(args, kwargs, name) for name in frozen],
                           [arg(args, kwargs, name) for name in same_dtype]):
                from . import kernels
                return getattr(kernels, op)(*args, **kwargs)
            return getattr(reference, op)(*args, **kwargs)

        return dispatch
    return wrap


@_op(frozen=("weight", "bias"), same_dtype=("A", "B"))
def lora(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float,
         dropout: float = 0.0, training: bool = False) -> Tensor:
    """y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ; see `reference.lora`."""


@_op(like="weight", frozen=("weight",), same_dtype=("A", "B"), ndim={"weight": 2})
def dora_norm(weight: Tensor, A: Tensor, B: Tensor, scale: float, weight_norm_sq: Tensor | None = None) -> Tensor:
    """Row norms of W + s·B·A by the factored formula (one weight per expert, (E, out, in): the reference);
    see `reference.dora_norm`."""


@_op(frozen=("weight", "bias"), same_dtype=("A", "B", "magnitude"))
def dora(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, magnitude: Tensor, scale: float,
         dropout: float = 0.0, training: bool = False, weight_norm_sq: Tensor | None = None,
         detach_norm: bool = True) -> Tensor:
    """y = (m / n) ⊙ (x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ) + b; see `reference.dora`."""


@_op(same_dtype=("residual", "down_weight", "down_bias", "up_weight", "up_bias"))
def bottleneck(x: Tensor, residual: Tensor, down_weight: Tensor, down_bias: Tensor | None, up_weight: Tensor,
               up_bias: Tensor | None, scale: float = 1.0, act: str = "relu") -> Tensor:
    """y = residual + s·up(act(down(x))); see `reference.bottleneck`."""


@_op(frozen=("weight", "bias"), same_dtype=("A", "B"))
def lora_routed(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: Tensor, index: Tensor,
                dropout: tuple[float, ...] = (), training: bool = False) -> Tensor:
    """LoRA with a task per sample: A (T, r, in), B (T, out, r), scale (T,), index (N,); see `reference.lora_routed`."""


@_op(frozen=("weight", "bias"), same_dtype=("A", "B", "magnitude"))  # not norm: float32 from dora_norm
def dora_routed(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, magnitude: Tensor, norm: Tensor,
                scale: Tensor, index: Tensor, dropout: tuple[float, ...] = (), training: bool = False) -> Tensor:
    """DoRA with a task per sample and the task norms (T, out) given; see `reference.dora_routed`."""


@_op(same_dtype=("residual", "down_weight", "down_bias", "up_weight", "up_bias"))
def bottleneck_routed(x: Tensor, residual: Tensor, down_weight: Tensor, down_bias: Tensor, up_weight: Tensor,
                      up_bias: Tensor, scale: Tensor, index: Tensor, act: str = "relu") -> Tensor:
    """Bottleneck adapters with a task per sample: down (T, m, d_in), up (T, d, m); see `reference.bottleneck_routed`."""


def grouped_lora(x: Tensor, offsets: Tensor, weight: Tensor, A: Tensor | None, B: Tensor | None, scale: float,
                 row_scale: Tensor | None = None, dropout: float = 0.0, training: bool = False) -> Tensor:
    """Rows grouped by expert: x (S, in), offsets (E,) cumulative row counts, weight (E, out, in), A (E, r, in) and
    B (E, out, r) or one pair for every expert or None, row_scale (E, out) or None; see `reference.grouped_lora`.
    torch's grouped multiply (`grouped.py`) where it takes the operands and the mode is not off, else the loop."""
    impl = grouped if mode() != "off" and grouped.supports(x, weight, A, B) else reference
    return impl.grouped_lora(x, offsets, weight, A, B, scale, row_scale, dropout, training)


__all__ = ["ACTIVATIONS", "MODES", "OPS", "bottleneck", "bottleneck_routed", "builds", "dora", "dora_norm",
           "dora_routed", "grouped_lora", "lora", "lora_routed", "mode", "path", "reference", "use_kernels"]
