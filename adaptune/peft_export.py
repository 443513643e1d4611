"""LoRA and DoRA in Hugging Face PEFT's on-disk format, both ways.

A PEFT LoRA directory holds `adapter_config.json` (peft_type "LORA", r, lora_alpha, use_dora,
rank_pattern, alpha_pattern, ...) and `adapter_model.safetensors` with, per adapted module,
`base_model.model.<module path>.lora_A.weight` (r, in), `.lora_B.weight` (out, r) and, for DoRA,
`.lora_magnitude_vector` (out,). PEFT's scale is lora_alpha / r, as adaptune's alpha / r. A LoRA on an
embedding table (nn.Embedding: 'embed' or its path) is `.lora_embedding_A` (r, num_embeddings) and
`.lora_embedding_B` (dim, r), as PEFT's lora.Embedding saves them.

export_peft: one PEFT LoRA per adapted Linear / Conv1D. LoRAs on row slices of one fused
projection (GPT-2's c_attn: q, k, v) become one LoRA of rank r_total = Σ r_i on the whole module:
A = [A_q; A_k; A_v] (r_total, in), B block-diagonal (out, r_total) with zero rows for slices left
unadapted. Scales stay exact: lora_alpha = s·r_total when the slices share s, else each s_i is folded
into its block of B and lora_alpha = r_total. A DoRA magnitude of an unadapted row is ‖W_i‖ (factor 1).
use_rslora is written when every exported component has rslora=True (then lora_alpha = s·√r_total).
A PiSSA / OLoRA component (rank r, frozen A₀, B₀: see components/lora.py) exports as the plain LoRA
that gives the same outputs on the unmodified base: A′ = [A; A₀], B′ = [B, −B₀], rank 2r, with
init_lora_weights true, as PEFT's save_pretrained(path_initial_model_for_weight_conversion=...) does.
Modules whose rank or alpha differ from the most common ones go in rank_pattern / alpha_pattern,
keyed by module path (PEFT matches a key k against a module name n by `(.*\\.)?(k)$`).

Trainable modules (components/trainable.py) export as PEFT's modules_to_save: the copy's state dict under
`base_model.model.<module path>.<name>` (the names PEFT's save_pretrained writes) and the paths in the
config's modules_to_save. BitFit has no PEFT equivalent (PEFT's bias="all" / "lora_only" write trained
values into the base biases themselves, of every layer or of every LoRA layer): it is refused, or left
out with skip_unsupported.

LoRA on a mixture of experts' fused weights (ExpertsLoRAModule: 'ffn.experts[.gate_up|down]', A (E, r, in),
B (E, out, r)) exports as PEFT's LoRA on bare parameters: `target_parameters` lists the parameter paths
(`<experts module>.gate_up_proj` / `.down_proj`) and PEFT's ParamWrapper holds, for a weight (E, out, in)
of E experts of rank r, lora_A.weight (E·r, in) with expert e's A_e in rows e·r … e·r+r−1 (expert-major)
and lora_B.weight (out, r·E) with column j·E + e holding column j of B_e (expert-minor): lora_A = A.reshape(E·r,
in), lora_B = B.permute(1, 2, 0).reshape(out, r·E); scaling lora_alpha / r with r the rank of one expert.
PEFT wraps the targeted parameters of one module in the order the module declares them, the first innermost,
so the keys of the inner wrapper have `.base_layer` in them: with both targeted,
`<experts>.base_layer.lora_A.weight` is gate_up_proj's and `<experts>.lora_A.weight` is down_proj's.
rank_pattern / alpha_pattern keys of such a layer are its parameter path. experts="one" (one pair for every
expert) exports with the pair repeated for each expert (the same outputs; re-imported, every expert has its
own copy). PEFT's ParamWrapper refuses lora_dropout, use_dora and fan_in_fan_out: with expert layers
lora_dropout is written as 0 (with a warning when a component has dropout), and DoRA or a Conv1D layer
beside them is refused.

import_peft (peft_import.py): the inverse, onto raw module paths of the model (expert LoRAs onto
'layers.N.ffn.experts.gate_up|down'), all or nothing.

Not carried over: DoRA's detach_norm=False (PEFT always detaches the norm; outputs are equal);
differing dropouts (PEFT has one lora_dropout: the largest is written, with a warning); adaptune's
limit r <= min(in, out) applies on import, so a fused export of rank r_total > in does not re-import;
PEFT adapters whose base weights were changed at init (LoftQ, PiSSA, OLoRA unconverted) import as
their saved tensors only; unconverted PiSSA / OLoRA adapters import as LoRA(init=...), which
recomputes the residual from the base weights as PEFT does when it loads them.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import Tensor, nn

from .adaptation import Adaptation, adaptation_of
from .components.dora import DoRA, DoRAModule
from .components.lora import ExpertsLoRAModule, LoRA, LoRAModule
from .components.trainable import Trainable
from .errors import AdaptuneError, WriteError
from .files import atomic_write_dir
from .hooks import Binding
from .points import EXPERTS, MODULE, PROJECTION, Conv1D, expert_weight, is_table, linear_weight
from .quantized import row_norm_sq
from .save_format import agree, full, gathered, is_sharded, on_rank0

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_OURS = {CONFIG_NAME, WEIGHTS_NAME, "README.md"}  # what an earlier export (or PEFT's save) leaves


@dataclass
class PeftLayer:
    """One PEFT LoRA on one module: what a directory holds per adapted module."""
    path: str  # module path inside the model, e.g. "transformer.h.0.attn.c_attn"
    A: Tensor  # (r, in)
    B: Tensor  # (out, r)
    scale: float  # s: the update is s·B·A
    magnitude: Tensor | None  # (out,) for DoRA
    dropout: float
    conv1d: bool
    rslora: bool | None  # every component on the module has rslora=True; None: either (an expert layer)
    alpha: float = 0.0  # PEFT's lora_alpha: s = alpha / r (alpha / √r with use_rslora); set by peft_layers
    table: bool = False  # an embedding table: saved as lora_embedding_A / lora_embedding_B
    experts: int = 0  # E for a LoRA on a fused experts parameter (`path` is the parameter's path,
    # A (E·r, in), B (out, r·E) in PEFT's layout); 0 for a module
    key: str = ""  # the module path in the tensor names (`.base_layer` inside for a nested ParamWrapper); "": path

    @property
    def r(self) -> int:
        return self.A.shape[0] // max(self.experts, 1)


def export_peft(model_or_adaptation: nn.Module | Adaptation, directory: str | os.PathLike,
                task: str | None = None, *, skip_unsupported: bool = False) -> Path:
    """Write the LoRA / DoRA components (and Trainable modules, as modules_to_save) of the shared set plus
    `task` in PEFT's format.

    task: the task whose components join the shared ones (default: the active task).
    skip_unsupported: leave out components other than LoRA / DoRA / Trainable (default: raise AdaptuneError).
    LoRA on a mixture of experts ('ffn.experts') is written as PEFT's target_parameters (see above).
    Exports whether or not the components are enabled; refuses while they are merged.
    The directory is written into a temporary sibling and swapped into place, so an earlier
    export there survives any failure; a directory holding other files is refused.
    Load the result with `peft.PeftModel.from_pretrained(base_model, directory)`.
    On a model sharded by FSDP2 every rank calls it: the components are gathered whole and rank 0 writes.
    """
    adaptation = adaptation_of(model_or_adaptation)
    target = Path(directory)
    sharded = is_sharded(adaptation)
    if sharded:
        agree("export_peft", target, adaptation)
    with gathered(adaptation):
        layers = peft_layers(adaptation, task, skip_unsupported=skip_unsupported)
        config = peft_config(adaptation.model, layers)
        saved = saved_modules(adaptation, task)
        config["modules_to_save"] = sorted(saved) or None
        tensors = {PREFIX + path + "." + name: t for path, state in saved.items() for name, t in state.items()}
        for layer in layers:
            key = PREFIX + (layer.key or layer.path)
            a, b = (".lora_embedding_A", ".lora_embedding_B") if layer.table else (".lora_A.weight", ".lora_B.weight")
            tensors[key + a], tensors[key + b] = layer.A, layer.B
            if layer.magnitude is not None:
                tensors[key + ".lora_magnitude_vector"] = layer.magnitude
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    if sharded:
        on_rank0("export_peft", target, adaptation, lambda: _write_export(target, config, tensors))
    else:
        _write_export(target, config, tensors)
    return target


# ---- export: adaptune components -> PEFT layers --------------------------------------------------

def saved_modules(adaptation: Adaptation, task: str | None = None) -> dict[str, dict[str, Tensor]]:
    """Module path -> the state dict of its trained copy, for the Trainable modules of the shared set plus `task`."""
    task = adaptation.task if task is None else task
    groups = (None,) if task is None else (None, task)
    return {b.point.site: b.module.module.state_dict() for b in adaptation.bindings(groups, kind=MODULE)}


def _number(x: float) -> float | int:
    return int(round(x)) if abs(x - round(x)) <= 1e-9 * max(1.0, abs(x)) else x


def peft_layers(adaptation: Adaptation, task: str | None = None, *,
                skip_unsupported: bool = False) -> list[PeftLayer]:
    """The PEFT LoRAs equivalent to the shared set plus `task` (default: the active task)."""
    task = adaptation.task if task is None else task
    groups = (None,) if task is None else (None, task)
    bindings = adaptation.bindings(groups, kind=PROJECTION)  # TaskError for an unknown task
    _check_unwrapped(adaptation.model)
    if adaptation.merged:
        raise AdaptuneError("cannot export while updates are merged into the base weights; call unmerge() first")
    other = [f"{sel}: {c!r}" for g in groups for sel, stack in adaptation.specs.get(g, {}).items()
             for c in stack if type(c) not in (LoRA, DoRA, Trainable)]
    if other and not skip_unsupported:
        raise AdaptuneError(f"only LoRA and DoRA export to PEFT's format (and Trainable modules, as modules_to_save); "
                            f"this adaptation also has {', '.join(other)}. Pass skip_unsupported=True to export "
                            f"the others alone")
    names = {id(m): n for n, m in adaptation.model.named_modules()
             if n != "adaptune" and not n.startswith("adaptune.")}
    by_module: dict[nn.Module, list[Binding]] = {}
    for b in bindings:
        if type(b.module) in (LoRAModule, DoRAModule):
            by_module.setdefault(b.point.module, []).append(b)
    layers = [_layer(names[id(module)], module, found) for module, found in by_module.items()]
    experts = expert_layers([b for b in adaptation.bindings(groups, kind=EXPERTS)
                             if not skip_unsupported or type(b.module) is ExpertsLoRAModule], names)
    if not layers + experts:
        where = "the shared set" + (f" and task {task!r}" if task is not None else "")
        raise AdaptuneError(f"nothing to export: {where} has no LoRA or DoRA component")
    if len({layer.magnitude is None for layer in layers}) > 1:
        raise AdaptuneError("this adaptation mixes LoRA and DoRA, but PEFT's format has one use_dora flag for all "
                            "modules; export an adaptation (or task) that uses only LoRA or only DoRA")
    if experts:
        beside = [layer.path for layer in layers if layer.magnitude is not None or layer.conv1d]
        if beside:
            raise AdaptuneError(f"LoRA on a mixture of experts exports as PEFT's target_parameters, whose ParamWrapper "
                                f"refuses use_dora and fan_in_fan_out, but this adaptation also has DoRA or a Conv1D "
                                f"layer at {', '.join(beside[:3])}; export those in a separate adaptation (or task)")
    layers += experts
    votes = [layer.rslora for layer in layers if layer.rslora is not None]
    rslora = bool(votes) and all(votes)  # PEFT has one use_rslora flag: alpha follows it
    for layer in layers:
        layer.rslora = rslora
        layer.alpha = _number(layer.scale * (layer.r ** 0.5 if rslora else layer.r))
    return layers


def _check_unwrapped(model: nn.Module) -> None:
    """Refuse a model that PEFT wraps or has adapted: its module paths are not the base model's
    (`base_model.model.` in front, `.base_layer` inside), so the keys written would name modules that
    PeftModel.from_pretrained(base_model, ...) does not have."""
    found = next(((n, m) for n, m in model.named_modules() if type(m).__module__.split(".")[0] == "peft"), None)
    if found is not None:
        name, module = found
        raise AdaptuneError(f"cannot export: the model is wrapped or adapted by PEFT ({type(module).__name__} at "
                            f"{name or 'the top'!r}), so its module paths are not the base model's and PEFT could "
                            f"not load the file; attach adaptune to the base model itself (before get_peft_model, "
                            f"or after PeftModel.unload() / merge_and_unload()) and export from there")


@torch.no_grad()
def _layer(path: str, module: nn.Module, bindings: list[Binding]) -> PeftLayer:
    """Merge the updates on the slices of one module into one PEFT LoRA of rank Σ r_i."""
    if len({isinstance(b.module, DoRAModule) for b in bindings}) > 1:
        raise AdaptuneError(f"{path} has LoRA on some slices and DoRA on others; PEFT's format cannot express that")
    weight = linear_weight(module)  # (out, in)
    bindings = sorted(bindings, key=lambda b: b.point.out_rows.start)
    bounds = [b.module for b in bindings]
    updates = [b.update() for b in bounds]  # (A′, B′): rank 2r for PiSSA / OLoRA
    scales = {b.scale for b in bounds}
    common = len(scales) == 1
    r_total = sum(a.shape[0] for a, _ in updates)
    A = torch.cat([a for a, _ in updates], dim=0)  # (r_total, in)
    B = A.new_zeros(weight.shape[0], r_total)  # (out, r_total)
    col = 0
    for rows, b, (a, b_) in zip((b.point.out_rows for b in bindings), bounds, updates):
        r = a.shape[0]
        B[rows, col:col + r] = b_ if common else b_ * b.scale  # (d, r) block
        col += r
    magnitude = None
    if isinstance(bounds[0], DoRAModule):
        magnitude = full(row_norm_sq(weight)).sqrt().to(bounds[0].magnitude.dtype)  # (out,): factor 1 off the slices
        for binding in bindings:
            magnitude[binding.point.out_rows] = binding.module.magnitude
    dropouts = sorted({b.dropout for b in bounds})
    scale = scales.pop() if common else 1.0
    return PeftLayer(path, A, B, scale, magnitude, dropouts[-1], isinstance(module, Conv1D),
                     all(b.rslora for b in bounds), table=is_table(module))


@torch.no_grad()
def expert_layers(bindings: list[Binding], names: dict[int, str]) -> list[PeftLayer]:
    """The PEFT LoRAs on bare parameters (target_parameters) equal to the expert LoRAs of `bindings`."""
    wrapped: dict[nn.Module, set[str]] = {}
    for b in bindings:
        if type(b.module) is not ExpertsLoRAModule:
            raise AdaptuneError(f"{type(b.module).__name__} at {b.point.where()} does not export to PEFT's format: "
                                f"PEFT adapts a mixture of experts' fused weights with plain LoRA only "
                                f"(target_parameters, whose ParamWrapper refuses use_dora); use LoRA on the experts, "
                                f"or pass skip_unsupported=True to export the other components alone")
        wrapped.setdefault(b.point.module, set()).add(f"{b.point.part}_proj")
    out = []
    for b in bindings:
        module, param = b.point.module, f"{b.point.part}_proj"
        order = [n for n, _ in module.named_parameters(recurse=False) if n in wrapped[module]]  # PEFT's nesting
        path = names[id(module)]
        E, d_out, d_in = expert_weight(b.point).shape
        A, B = b.module.A, b.module.B  # (E, r, in), (E, out, r); experts="one": (r, in), (out, r), repeated
        if A.dim() == 2:
            A, B = A.expand(E, *A.shape), B.expand(E, *B.shape)
        r = A.shape[1]
        out.append(PeftLayer(f"{path}.{param}", A.reshape(E * r, d_in), B.permute(1, 2, 0).reshape(d_out, r * E),
                             b.module.scale, None, b.module.dropout, False, getattr(b.module, "rslora", None),
                             experts=E, key=path + ".base_layer" * (len(order) - 1 - order.index(param))))
    return out


def _pattern_key(path: str) -> str:
    """A rank_pattern / alpha_pattern key matching `path` under PEFT's regex (dots may stay bare)."""
    escaped = re.escape(path)
    return path if escaped.replace("\\.", ".") == path else escaped


def peft_config(model: nn.Module, layers: list[PeftLayer]) -> dict[str, Any]:
    """adapter_config.json for `layers`: only keys PEFT's LoraConfig accepts."""
    r = Counter(layer.r for layer in layers).most_common(1)[0][0]
    alpha = Counter(layer.alpha for layer in layers).most_common(1)[0][0]
    dropouts = sorted({layer.dropout for layer in layers})
    experts = any(layer.experts for layer in layers)
    dropout = 0.0 if experts else dropouts[-1]
    if experts and dropouts[-1]:
        warnings.warn(f"PEFT's LoRA on a mixture of experts (target_parameters) refuses lora_dropout; these components "
                      f"use {dropouts}, writing 0.0 (dropout does not change outputs in eval mode)", stacklevel=3)
    elif len(dropouts) > 1:
        warnings.warn(f"PEFT's format has one lora_dropout; these components use {dropouts}, writing "
                      f"{dropouts[-1]} (dropout does not change outputs in eval mode)", stacklevel=3)
    config = getattr(model, "config", None)
    name = getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None) or None
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": name,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(layer.path for layer in layers if not layer.experts),
        "target_parameters": sorted(layer.path for layer in layers if layer.experts) or None,
        "rank_pattern": {_pattern_key(layer.path): layer.r for layer in layers if layer.r != r},
        "alpha_pattern": {_pattern_key(layer.path): layer.alpha for layer in layers if layer.alpha != alpha},
        "lora_dropout": dropout,
        "fan_in_fan_out": any(layer.conv1d for layer in layers),
        "bias": "none",
        "use_rslora": layers[0].rslora,
        "use_dora": layers[0].magnitude is not None,
        "lora_bias": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


# ---- writing the directory ---------------------------------------------------------------------------

def _write_files(directory: Path, config: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    from safetensors.torch import save_file
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    with open(directory / CONFIG_NAME, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _write_export(target: Path, config: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    """Check `target` is a directory adaptune may write over (or nothing), then write it atomically."""
    if target.is_symlink():  # swap at the real place, so the link keeps pointing at the export
        target = target.resolve()
    if target.exists() and not target.is_dir():
        raise AdaptuneError(f"cannot export to {str(target)!r}: it is a file, not a directory")
    if target.is_dir():
        extra = sorted(set(os.listdir(target)) - _OURS)
        if extra:
            raise AdaptuneError(f"cannot export to {str(target)!r}: it holds other files ({', '.join(extra[:5])}); "
                                f"export into a new directory or over an earlier export")
    try:
        atomic_write_dir(target, lambda tmp: _write_files(tmp, config, tensors))
    except SafetensorError as e:
        raise WriteError(f"cannot export to {str(target)!r}: {e}") from e
