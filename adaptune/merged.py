"""merged_float(model): a float copy of an adapted model with the active updates folded in and no adaptation.

The export path for a quantized base (merging into quantized weights requantizes them, adding an error of its
own): every quantized layer of the copy becomes an nn.Linear holding its dequantized weight, plus the active
LoRA / DoRA update of its rows; BitFit shifts go into the biases; a Trainable module is replaced by the active
task's trained copy. The adapted model itself is left as it was. Components that do not fold into weights
(adapters, prefixes, prompts, ...) cannot be carried by a plain model: merged_float refuses them.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .adaptation import Adaptation, adaptation_of
from .errors import MergeError
from .points import MODULE, PROJECTION, linear_weight, tied_to
from .quantized import QuantizedWeight, scheme


def merged_float(model: nn.Module | Adaptation, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A copy of the adapted model in `dtype`, its quantized layers dequantized into nn.Linear, the active task's
    (and the shared) LoRA, DoRA, BitFit and Trainable components folded in; the model given is unchanged."""
    adaptation = adaptation_of(model)
    if adaptation.merged or adaptation.routing is not None:
        raise MergeError("merged_float() folds the active updates into a copy: call it outside route() and with the "
                         "updates unmerged (unmerge() first)")
    active = [b for hook in adaptation.hooks.values() for b in hook.active()]
    others = sorted({type(b.module).__name__ for b in active if b.point.kind not in (PROJECTION, MODULE)})
    if others:
        raise MergeError(f"merged_float() folds LoRA, DoRA, BitFit and Trainable into weights; the active "
                         f"{', '.join(others)} cannot be folded: make them inactive (use() a task without them) "
                         f"or keep the model adapted")
    no_bias = [b.point.where() for b in active if b.point.kind == PROJECTION and b.module.bias_only
               and b.point.module.bias is None]
    if no_bias:
        raise MergeError(f"merged_float(): BitFit at {no_bias[0]} shifts a layer without bias, which a plain layer "
                         f"cannot carry; nothing was copied")
    for b in (b for b in active if b.point.kind == PROJECTION and not b.module.bias_only):
        tied = tied_to(adaptation.model, b.point.module, b.point.module.weight)
        if tied:
            raise MergeError(f"merged_float(): {type(b.module).__name__} at {b.point.where()} updates a weight tied to "
                             f"{', '.join(tied)}, which a plain model would change too; nothing was copied")
    twin = copy.deepcopy(adaptation.model)
    ours = twin.adaptune
    paths = {id(m): name for name, m in twin.named_modules()}
    weights, biases, copies = {}, {}, {}
    with torch.no_grad():
        for b in (b for hook in ours.hooks.values() for b in hook.active()):
            module = b.point.module
            if b.point.kind == MODULE:
                copies[paths[id(module)]] = b.module.module
                continue
            if b.module.bias_only:
                bias = biases.setdefault(paths[id(module)], module.bias.detach().float().clone())
                bias[b.point.out_rows] = b.module.merged_bias(bias[b.point.out_rows])
                continue
            weight = weights.setdefault(paths[id(module)], _float(linear_weight(module)))
            weight[b.point.out_rows] = b.module.merged_weight(weight[b.point.out_rows])
    ours.detach()
    for name, module in list(twin.named_modules()):
        if name in copies:
            _replace(twin, name, copies[name])
        elif scheme(module) or name in weights or name in biases:
            _replace(twin, name, _linear(module, weights.get(name), biases.get(name), dtype))
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(twin, flag, False):
            setattr(twin, flag, False)
    return twin.to(dtype)


def _float(weight) -> torch.Tensor:
    return weight.dequantize() if isinstance(weight, QuantizedWeight) else weight.detach().float().clone()


def _linear(module: nn.Module, weight, bias, dtype: torch.dtype) -> nn.Module:
    """The layer with `weight` / `bias` (float, or None: its own, dequantized) in place of its own: an nn.Linear
    for a quantized layer, else the layer itself (a Conv1D keeps its transposed storage)."""
    weight = _float(linear_weight(module)) if weight is None else weight
    own = getattr(module, "bias", None)  # an embedding table has none
    bias = own.detach().float() if bias is None and own is not None else bias
    if not scheme(module):
        with torch.no_grad():
            linear_weight(module).copy_(weight.to(module.weight.dtype))
            if bias is not None:
                module.bias.copy_(bias.to(module.bias.dtype))
        return module
    linear = nn.Linear(module.in_features, module.out_features, bias=bias is not None, dtype=dtype,
                       device=weight.device)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear.requires_grad_(module.weight.requires_grad)


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)
