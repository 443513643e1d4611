"""Quantized frozen bases: a quantized layer's weight as the ops see it, and `quantize(model, scheme)`.

Supported layers, recognised by what they are (the classes of the layer and of its weight), never by the
shape of their storage:

| package      | layer (weight)                           | schemes                                            |
|--------------|------------------------------------------|----------------------------------------------------|
| bitsandbytes | Linear4bit (Params4bit)                  | nf4, fp4; double quantisation; any compute dtype   |
| bitsandbytes | Linear8bitLt (Int8Params), inference     | LLM.int8(): int8 rows with absmax scales            |
| torchao      | nn.Linear with a TorchAOBaseTensor weight | weight-only (Int8WeightOnlyConfig tested; int4: GPU layouts) |

Any other quantized layer (GPTQ, AWQ, HQQ, FP8, ...) is refused with a BindError (points.check_quantized).
merge() requantizes bitsandbytes weights; a torchao weight's requantization is its config's, which the layer
does not keep, so merge() refuses it (merge into a float copy of the model instead).

A `QuantizedWeight` stands where the ops take a weight tensor W (out, in). The reference ops compute x·Wᵀ
through the layer's own forward (`linear`), W·Aᵀ as the layer applied to the rows of A (`times`: DoRA's
norm), and ‖W_i‖² from a dequantization of one block of rows at a time (`row_norm_sq`): W is never
kept dequantized. merge() dequantizes, adds and requantizes (`requantize`), keeping the original storage
(`storage` / `restore`) so that unmerge() gives it back bit for bit.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError

ROWS_PER_BLOCK = 1024  # rows dequantized at once for the row norms: a (1024, in) float32 temporary
SCHEMES = ("nf4", "fp4", "int8")  # what quantize() makes (bitsandbytes)


def _names(obj: Any) -> set[str]:
    return {f"{c.__module__}.{c.__name__}" for c in type(obj).__mro__}


def scheme(module: nn.Module) -> str | None:
    """The supported quantization of `module` in words ("bitsandbytes nf4", "bitsandbytes int8", "torchao
    Int8Tensor"); None when it is not a supported quantized layer."""
    weight = getattr(module, "weight", None)
    if weight is None or type(weight) in (nn.Parameter, Tensor):  # a float layer: the quantizers' weights are
        return None  # subclasses (and torch.compile traces this line, not a walk over classes)
    names = _names(module)
    if "bitsandbytes.nn.modules.Linear4bit" in names and getattr(weight, "quant_state", None) is not None:
        return f"bitsandbytes {weight.quant_state.quant_type}"
    if "bitsandbytes.nn.modules.Linear8bitLt" in names and isinstance(weight, Tensor) and weight.dtype == torch.int8:
        return "bitsandbytes int8"
    if isinstance(module, nn.Linear) and "torchao.utils.TorchAOBaseTensor" in _names(weight):
        return f"torchao {type(weight).__name__}"
    return None


@dataclass(frozen=True)
class Storage:
    """What a quantized layer's weight is made of, as merge() found it: given back by `restore`."""
    data: Tensor
    state: Any  # bitsandbytes' QuantState (4-bit) or row scales (int8)


class QuantizedWeight:
    """The (out, in) weight of a supported quantized layer, or the output rows `rows` of it."""

    def __init__(self, module: nn.Module, rows: tuple[int, int] | None = None) -> None:
        self.module, self.rows = module, rows
        self.scheme = scheme(module)
        if self.scheme is None:
            raise ConfigError(f"{type(module).__name__} is not a supported quantized layer")
        out = module.out_features
        self.shape = ((rows[1] - rows[0]) if rows else out, module.in_features)
        self.device = next(t.device for t in (module.weight, module.bias) if t is not None)
        self.dtype = torch.float32  # the ops compute with it in float32 at least
        self.requires_grad = False

    def __getitem__(self, rows: slice) -> "QuantizedWeight":
        start, stop, _ = rows.indices(self.shape[0])
        base = self.rows[0] if self.rows else 0
        return QuantizedWeight(self.module, (base + start, base + stop))

    def _select(self, y: Tensor) -> Tensor:
        return y[..., self.rows[0]:self.rows[1]] if self.rows else y

    def linear(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        """x·Wᵀ (+ bias): the layer's own forward (its class's, not a hook's) less its bias; in x's dtype."""
        module = self.module
        y = type(module).forward(module, x)
        if module.bias is not None:
            y = y - module.bias.to(y.dtype)
        y = self._select(y).to(x.dtype)
        return y if bias is None else y + bias.to(y.dtype)

    def times(self, A: Tensor) -> Tensor:
        """W·Aᵀ for A (..., r, in): (..., out, r), the layer applied to the rows of A, in A's dtype."""
        rows = A.reshape(-1, A.shape[-1])
        y = self.linear(rows)  # (R, out)
        return y.reshape(*A.shape[:-1], y.shape[-1]).mT

    def dequantize(self, rows: tuple[int, int] | None = None) -> Tensor:
        """Rows of W in float32: `rows` of this weight (all of them by default), dequantized alone where the
        format allows (bitsandbytes: blocks within rows), else sliced from the whole."""
        start, stop = rows or (0, self.shape[0])
        base = self.rows[0] if self.rows else 0
        return _dequantize(self.module, base + start, base + stop).float()

    def row_norm_sq(self) -> Tensor:
        """‖W_i‖² (out,) in float32, dequantizing ROWS_PER_BLOCK rows at a time."""
        with torch.no_grad():
            return torch.cat([self.dequantize((i, min(i + ROWS_PER_BLOCK, self.shape[0]))).pow(2).sum(1)
                              for i in range(0, self.shape[0], ROWS_PER_BLOCK)])

    def key(self) -> tuple:
        """Changes whenever the layer's storage does (a merge, a load): the row-norm cache's key."""
        w = self.module.weight
        return (id(self.module), w.data_ptr(), w._version, id(_state(self.module)), self.rows)

    # ---- merging ------------------------------------------------------------------------------

    @property
    def requantizable(self) -> bool:
        """Whether merge() can write into it: bitsandbytes' formats are requantized here, torchao's are not."""
        return self.scheme.startswith("bitsandbytes")

    def storage(self) -> Storage:
        return Storage(self.module.weight.data, _state(self.module))

    def restore(self, storage: Storage) -> None:
        _set_storage(self.module, storage)

    def requantize(self, rows: Tensor) -> tuple[float, float]:
        """Write `rows` (this weight's rows, float) into the layer: dequantize the rest, requantize the whole;
        returns the error it introduces on these rows (max |ΔW|, and ‖ΔW‖ / ‖W‖)."""
        whole = _dequantize(self.module).float()  # (out, in)
        start, stop = self.rows or (0, whole.shape[0])
        whole[start:stop] = rows.to(whole)
        _set_storage(self.module, _quantize(self.module, whole))
        error = self.dequantize() - rows.float()
        return float(error.abs().max()), float(error.norm() / rows.float().norm().clamp_min(1e-30))


@torch.no_grad()
def row_norm_sq(weight: Tensor | QuantizedWeight, dtype: torch.dtype = torch.float32) -> Tensor:
    """‖W_i‖² (out,) in `dtype` (float32 for a quantized weight), of a float weight or a quantized one, outside
    autograd; (E, out) of one weight per expert, computed an expert at a time (a float32 copy of every expert's
    weight at once would be E times one layer's)."""
    if isinstance(weight, QuantizedWeight):
        return weight.row_norm_sq()
    if weight.dim() == 3:
        return torch.stack([w.detach().to(dtype).pow(2).sum(-1) for w in weight])
    return weight.detach().to(dtype).pow(2).sum(-1)


def parameter_count(model: nn.Module, leave_out: set[int] | frozenset[int] = frozenset()) -> int:
    """The parameters of `model` (but those whose id is in `leave_out`) as in float: a quantized layer's weight
    counts out × in, whatever its storage holds (4-bit packs two a byte)."""
    logical = {id(m.weight): m.in_features * m.out_features for m in model.modules() if scheme(m)}
    return sum(logical.get(id(p), p.numel()) for p in model.parameters() if id(p) not in leave_out)


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and "transformers" in type(module).__module__


def keep_differentiable(model: nn.Module) -> dict[nn.Module, bool]:
    """Keep every bitsandbytes 4-bit layer of `model` on its differentiable path; returns what to give back to
    `release`. On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight for a bf16 kernel the first time the
    layer runs in eval mode without gradients, and keeps it so; that kernel has no backward, so every later
    training step would silently get no gradient through the layer. While adapted, the layers stay unpacked
    (a weight already repacked is unpacked, its bf16 scales kept as they are)."""
    held = {}
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False) and scheme(module):
            held[module] = True
            module.support_avx512bf16_for_cpu = False
            state = module.weight.quant_state
            if getattr(state, "packing_format_for_cpu", False):
                module.weight.data, module.weight.quant_state = _unpacked(module.weight.data, state)
    return held


def release(held: dict[nn.Module, bool]) -> None:
    """Give the layers `keep_differentiable` held their own choice back."""
    for module, flag in held.items():
        module.support_avx512bf16_for_cpu = flag


def linear(x: Tensor, weight: Tensor | QuantizedWeight, bias: Tensor | None = None) -> Tensor:
    """x·Wᵀ + b for a float weight or a quantized one."""
    return weight.linear(x, bias) if isinstance(weight, QuantizedWeight) else F.linear(x, weight, bias)


def times(weight: Tensor | QuantizedWeight, A: Tensor) -> Tensor:
    """W·Aᵀ for a float weight (out, in) or a quantized one, A (..., r, in): (..., out, r)."""
    return weight.times(A) if isinstance(weight, QuantizedWeight) else weight @ A.mT


# ---- the packages' formats ------------------------------------------------------------------------

def _state(module: nn.Module) -> Any:
    weight = module.weight
    if hasattr(weight, "quant_state"):
        return weight.quant_state
    if getattr(module, "state", None) is not None and type(weight).__name__ == "Int8Params":
        return module.state.SCB if module.state.SCB is not None else weight.SCB
    return None


def _dequantize(module: nn.Module, start: int = 0, stop: int | None = None) -> Tensor:
    """Rows start:stop of the layer's weight, dequantized (in its float dtype)."""
    weight = module.weight
    stop = module.out_features if stop is None else stop
    if hasattr(weight, "quant_state"):  # bitsandbytes 4-bit: its CPU path may have repacked the storage
        import bitsandbytes.functional as bnb_f
        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            data, state = _unpacked(data, copy.deepcopy(state))
        columns = module.in_features
        if columns % state.blocksize or columns % 2:  # blocks straddle rows: the whole, then the rows
            return bnb_f.dequantize_4bit(data, state)[start:stop]
        absmax = state.absmax
        if state.nested:  # double quantization: the block scales are quantized too (1/blocksize of W's size)
            absmax = bnb_f.dequantize_blockwise(state.absmax, state.state2) + state.offset
        per_row = columns // state.blocksize
        rows = bnb_f.QuantState(absmax=absmax[start * per_row:stop * per_row].float(), shape=(stop - start, columns),
                                code=state.code, blocksize=state.blocksize, quant_type=state.quant_type,
                                dtype=state.dtype)
        packed = data.reshape(-1).view(torch.uint8)[start * columns // 2:stop * columns // 2]  # 2 values a byte
        return bnb_f.dequantize_4bit(packed.reshape(-1, 1), rows)
    if type(weight).__name__ == "Int8Params":
        import bitsandbytes.functional as bnb_f
        return bnb_f.int8_vectorwise_dequant(weight.data[start:stop], _state(module)[start:stop].to(weight.device))
    return weight.dequantize()[start:stop]  # torchao: its tensors dequantize whole


def _unpacked(data: Tensor, state: Any) -> tuple[Tensor, Any]:
    """A 4-bit weight bitsandbytes repacked for its CPU kernel, back in its own format (rewrites `state`): its
    inverse leaves unnested block scales as the packing laid them, (in / blocksize, out) in bf16."""
    import bitsandbytes.functional as bnb_f
    data, state = bnb_f._convert_weight_packed_for_cpu_inverse(data, state)
    if state.absmax.dim() == 2:
        state.absmax = state.absmax.T.reshape(-1).float()
    return data, state


def _quantize(module: nn.Module, whole: Tensor) -> Storage:
    weight = module.weight
    if hasattr(weight, "quant_state"):
        import bitsandbytes.functional as bnb_f
        old = weight.quant_state  # as first quantized (bitsandbytes' CPU repacking keeps the originals aside)
        dtype, nested = getattr(old, "original_dtype", old.dtype), getattr(old, "original_nested", old.nested)
        storage = getattr(old, "original_storage_type", weight.data.dtype)
        data, state = bnb_f.quantize_4bit(whole.to(dtype), blocksize=old.blocksize, compress_statistics=nested,
                                          quant_type=old.quant_type, quant_storage=storage)
        return Storage(data, state)
    if type(weight).__name__ == "Int8Params":
        import bitsandbytes.functional as bnb_f  # as Int8Params quantizes, from float16
        data, scales, _ = bnb_f.int8_vectorwise_quant(whole.half())
        return Storage(data, scales)
    raise ConfigError(f"adaptune cannot requantize {scheme(module)} weights")


def _set_storage(module: nn.Module, storage: Storage) -> None:
    weight = module.weight
    weight.data = storage.data
    if hasattr(weight, "quant_state"):
        weight.quant_state = storage.state
    elif type(weight).__name__ == "Int8Params":
        module.state.SCB = storage.state
        module.state.CB = storage.data
        weight.SCB = weight.CB = None


# ---- quantizing a float model ---------------------------------------------------------------------

def quantize(model: nn.Module, scheme_name: str, *, compute_dtype: torch.dtype = torch.float32,
             skip: tuple[str, ...] = ("lm_head", "score", "classifier"), double_quant: bool = False) -> nn.Module:
    """Replace every nn.Linear and transformers Conv1D (GPT-2's, transposed) of `model` (but those whose name ends
    with one of `skip`: the heads) by a
    bitsandbytes layer of `scheme_name` ("nf4", "fp4": Linear4bit with `compute_dtype`; "int8": Linear8bitLt),
    quantized on the device it is on; returns the model. As transformers' BitsAndBytesConfig does on load, and
    marked as it marks the model (`is_loaded_in_4bit` / `is_loaded_in_8bit`), so that PEFT recognises it."""
    if scheme_name not in SCHEMES:
        raise ConfigError(f"unknown quantization {scheme_name!r}; valid: {', '.join(SCHEMES)}")
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ConfigError(f"quantizing to {scheme_name} needs bitsandbytes (pip install bitsandbytes)") from e
    targets = [(name, m) for name, m in model.named_modules()
               if (type(m) is nn.Linear or _is_conv1d(m)) and not name.split(".")[-1].endswith(skip)]
    for name, linear in targets:
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        device = linear.weight.device
        weight = linear.weight.t() if _is_conv1d(linear) else linear.weight  # (out, in)
        out_features, in_features = weight.shape
        if scheme_name == "int8":
            q = bnb.nn.Linear8bitLt(in_features, out_features, bias=linear.bias is not None, has_fp16_weights=False)
        else:
            q = bnb.nn.Linear4bit(in_features, out_features, bias=linear.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=double_quant,
                                  quant_type=scheme_name)
            if in_features % q.weight.blocksize or out_features % 32:  # bitsandbytes' CPU repacking fails on them
                q.support_avx512bf16_for_cpu = False
        q.load_state_dict({"weight": weight.detach().contiguous(),
                           **({"bias": linear.bias.detach()} if linear.bias is not None else {})})
        q.requires_grad_(False)
        setattr(parent, name.rpartition(".")[2], q.to(device))
    setattr(model, "is_loaded_in_8bit" if scheme_name == "int8" else "is_loaded_in_4bit", True)  # as transformers
    return model
