"""Reading a LoRA / DoRA adapter saved by Hugging Face PEFT and attaching it (see peft_export); its
modules_to_save (a SEQ_CLS adapter's classifier / score head) import as Trainable modules, its
lora_embedding_A / B as LoRA on the nn.Embedding. The copy of a targeted layer's base weights PEFT saves
with embedding LoRAs (`<path>.base_layer.weight`, save_embedding_layers) must equal this model's.
LoRA on a mixture of experts' fused weights (target_parameters) imports as LoRA on
'layers.N.ffn.experts.gate_up' / '.down' (peft_experts); a target_parameters entry naming any other parameter
is refused.

Every check (files, config, tensor names, module match, shapes) runs before anything is attached;
tensors are then copied into the bound components, and the adaptation is detached on any failure,
so a LoadError leaves the model unchanged.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .adaptation import Adaptation
from .attach import attach
from .components.dora import DoRA
from .components.lora import LoRA
from .components.trainable import Trainable
from .errors import AdaptuneError, LoadError
from .peft_experts import add_experts, expert_targets, split_experts
from .peft_export import CONFIG_NAME, PREFIX, WEIGHTS_NAME
from .peft_names import find_module, pattern_value
from .points import EXPERTS, Conv1D, is_linear, is_table, linear_dims
from .save_format import check_finite, check_state

_PARTS = {".lora_A.weight": "A", ".lora_B.weight": "B",  # PEFT's saved names, adapter name stripped
          ".lora_magnitude_vector": "magnitude", ".lora_magnitude_vector.weight": "magnitude",
          ".lora_embedding_A": "embedding_A", ".lora_embedding_B": "embedding_B"}  # on an nn.Embedding
_LABEL = {"A": "lora_A.weight", "B": "lora_B.weight", "magnitude": "lora_magnitude_vector",
          "embedding_A": "lora_embedding_A", "embedding_B": "lora_embedding_B"}
_BASE_COPY = ".base_layer."  # `<path>.base_layer.<name>`: a targeted layer's own weights (save_embedding_layers)
_UNSUPPORTED = {  # PEFT options that change what the saved tensors mean, or add tensors adaptune lacks
    "lora_bias": "a bias on lora_B",
    "trainable_token_indices": "trainable token embeddings",
    "layer_replication": "replicated layers",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "block-diagonal LoRA",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
    "arrow_config": "Arrow routing",
}
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")  # base untouched: the saved A, B are the LoRA
_RESIDUAL_INITS = ("pissa", "olora")  # base minus s·B₀·A₀, recomputable from the base: LoRA(init=...)


@dataclass
class Plan:
    """What import_peft attaches: the spec (module path -> LoRA / DoRA / Trainable) and each path's tensors."""
    directory: Path
    spec: dict[str, LoRA | Trainable] = field(default_factory=dict)
    weights: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)  # module path -> the PEFT module path it came from
    points: dict[str, str] = field(default_factory=dict)  # an experts selector -> the key of the point it binds

    def add(self, peft_path: str, path: str, component: LoRA | Trainable, tensors: dict[str, Tensor],
            point: str | None = None) -> None:
        if path in self.origin:
            raise LoadError(f"PEFT modules {self.origin[path]!r} and {peft_path!r} both match {path!r} of this model")
        self.origin[path], self.spec[path], self.weights[path] = peft_path, component, tensors
        if point is not None:
            self.points[path] = point


def import_peft(model: nn.Module, directory: str | os.PathLike, task_name: str | None = None, *,
                adapter_name: str | None = None, allow_nonfinite: bool = False) -> Adaptation:
    """Attach the LoRA / DoRA adapter that PEFT saved in `directory` to `model`; returns the Adaptation.

    Each PEFT module is matched to a module path of `model` (exactly, else by a unique suffix match,
    so `bert.encoder...` and `encoder...` find each other). task_name: put the components in that
    task instead of the shared set. A directory PEFT saved under a named adapter holds
    `<name>/adapter_config.json`: the only such subdirectory is used, or the one `adapter_name` names.
    use_rslora reads as LoRA(rslora=True); init_lora_weights "pissa" / "olora" (saved unconverted, for
    the residual base PEFT makes at load) as LoRA(init=...), which recomputes that residual from `model`.
    Tensors holding NaN or inf are refused unless `allow_nonfinite`.
    Raises LoadError naming the problem; the model is then unchanged.
    """
    if not isinstance(model, nn.Module):
        raise LoadError(f"import_peft needs a torch.nn.Module, got {type(model).__name__}")
    if isinstance(getattr(model, "adaptune", None), Adaptation):
        raise LoadError("this model already has an adaptation attached; call detach(model) first")
    return apply(model, plan(model, find_adapter(Path(directory), adapter_name), allow_nonfinite), task_name)


def plan(model: nn.Module, directory: Path, allow_nonfinite: bool = False) -> Plan:
    """Read and check the adapter in `directory` against `model` (files, config, tensor names, module match,
    shapes), changing nothing."""
    config = read_config(directory)
    init, use_dora = config.get("init_lora_weights", True), bool(config.get("use_dora", False))
    tensors = read_tensors(directory)
    if not allow_nonfinite:
        check_finite(tensors, f"{str(directory / WEIGHTS_NAME)!r}")
    tensors, saved = split_saved(tensors, config.get("modules_to_save") or [])
    modules, name = {n: m for n, m in model.named_modules() if n}, type(model).__name__
    targets = expert_targets(config.get("target_parameters") or [], modules, name)
    tensors, experts = split_experts(tensors, modules, targets)
    tensors, base_copies = split_base_copies(tensors)
    layers = split_keys(tensors, use_dora, required=not experts)
    for peft_path, state in base_copies.items():
        check_base_copy(peft_path, find_module(peft_path, modules, name), modules, state)
    out = Plan(directory)
    for peft_path, state in saved.items():
        path = find_module(peft_path, modules, name)
        check_state(modules[path].state_dict(), state, f"{WEIGHTS_NAME}: the saved module {peft_path!r}",
                    f"{path!r} here ({type(modules[path]).__name__})")
        out.add(peft_path, path, Trainable(), state)
    for peft_path, parts in layers.items():
        table = "embedding_A" in parts
        if table:
            if use_dora:
                raise LoadError(f"{peft_path!r} is a DoRA on an embedding table (lora_embedding_A / B with "
                                f"use_dora); adaptune's DoRA binds to Linear / Conv1D layers only, LoRA to embeddings")
            parts = {"A": parts["embedding_A"], "B": parts["embedding_B"]}
        path = match_module(peft_path, modules, name, table)
        r = pattern_value(config.get("rank_pattern"), peft_path, config["r"], "rank_pattern")
        alpha = pattern_value(config.get("alpha_pattern"), peft_path, config["lora_alpha"], "alpha_pattern")
        check_shapes(peft_path, path, modules[path], parts, r)
        if init == "olora" and isinstance(modules[path], Conv1D):
            raise LoadError(f"{peft_path!r} is a Conv1D with init_lora_weights 'olora': PEFT factors its transposed "
                            f"weight there, which adaptune's OLoRA does not reproduce; convert the adapter to "
                            f"plain LoRA in PEFT (path_initial_model_for_weight_conversion)")
        try:  # on an embedding PEFT applies no dropout and no PiSSA / OLoRA init
            component = (DoRA if use_dora else LoRA)(
                r=r, alpha=alpha, dropout=0.0 if table else config.get("lora_dropout") or 0.0,
                rslora=bool(config.get("use_rslora", False)),
                init=init if init in _RESIDUAL_INITS and not table else "default")
        except AdaptuneError as e:
            raise LoadError(f"{CONFIG_NAME} for {peft_path!r}: {e}") from e
        out.add(peft_path, path, component, parts)
    if experts:
        add_experts(out, model, config, experts, modules, targets)
    return out


def apply(model: nn.Module, plan: Plan, task_name: str | None = None) -> Adaptation:
    """Attach `plan`'s components (shared, or in task `task_name`) and copy its tensors in; all or nothing."""
    try:
        adaptation = attach(model, plan.spec) if task_name is None else attach(model, tasks={task_name: plan.spec})
    except AdaptuneError as e:
        raise LoadError(f"cannot attach the adapter in {str(plan.directory)!r}: {e}") from e
    try:
        bound = {b.point.key if b.point.kind == EXPERTS else b.point.site: b.module for b in adaptation.bindings()}
        with torch.no_grad():
            for path, parts in plan.weights.items():
                if isinstance(plan.spec[path], Trainable):
                    bound[path].module.load_state_dict(parts, strict=True)
                    continue
                for part, tensor in parts.items():
                    getattr(bound[plan.points.get(path, path)], part).copy_(tensor)
    except BaseException:
        adaptation.detach()
        raise
    return adaptation


def find_adapter(directory: Path, adapter_name: str | None = None) -> Path:
    """The directory holding adapter_config.json: `directory`, or its one named-adapter subdirectory."""
    if not directory.is_dir():
        raise LoadError(f"no PEFT adapter at {str(directory)!r}: not a directory")
    if adapter_name is not None:
        if (directory / adapter_name / CONFIG_NAME).is_file():
            return directory / adapter_name
        if adapter_name == "default" and (directory / CONFIG_NAME).is_file():
            return directory  # PEFT saves its "default" adapter at the top
        named = _named_adapters(directory)
        raise LoadError(f"{str(directory)!r} has no adapter named {adapter_name!r} (no {adapter_name}/{CONFIG_NAME})"
                        + (f"; it holds {', '.join(map(repr, named))}" if named else ""))
    if (directory / CONFIG_NAME).is_file():
        return directory
    named = _named_adapters(directory)
    if len(named) == 1:
        return directory / named[0]
    if len(named) > 1:
        raise LoadError(f"{str(directory)!r} holds several PEFT adapters ({', '.join(map(repr, named))}); "
                        f"pick one with adapter_name=")
    raise LoadError(f"{str(directory)!r} has no {CONFIG_NAME}, nor any subdirectory <adapter name>/{CONFIG_NAME} "
                    f"(where PEFT saves a named adapter); a PEFT adapter directory holds {CONFIG_NAME} and "
                    f"{WEIGHTS_NAME}")


def _named_adapters(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if (p / CONFIG_NAME).is_file())


def read_config(directory: Path) -> dict[str, Any]:
    """adapter_config.json, checked: a plain (or DoRA) LoRA whose options adaptune can represent."""
    if not directory.is_dir():
        raise LoadError(f"no PEFT adapter at {str(directory)!r}: not a directory")
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise LoadError(f"{str(directory)!r} has no {CONFIG_NAME}; a PEFT adapter directory holds "
                        f"{CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoadError(f"cannot read {str(path)!r}: {e}") from e
    if not isinstance(config, dict):
        raise LoadError(f"{str(path)!r} must hold a JSON object, got {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise LoadError(f"{str(path)!r} has peft_type {config.get('peft_type')!r}; only 'LORA' adapters "
                        f"(with or without use_dora) import")
    used = [f"{k} ({why})" for k, why in _UNSUPPORTED.items() if config.get(k)]
    if config.get("bias", "none") != "none":
        used.append(f"bias={config['bias']!r} (trained base biases)")
    init = config.get("init_lora_weights", True)
    if init not in _PLAIN_INITS + _RESIDUAL_INITS:
        used.append(f"init_lora_weights={init!r} (changes the base weights in a way adaptune cannot recompute; "
                    f"save it converted to plain LoRA with path_initial_model_for_weight_conversion)")
    entries = config.get("target_parameters") or []
    if not isinstance(entries, list) or not all(isinstance(n, str) and n for n in entries):
        raise LoadError(f"{str(path)!r}: target_parameters must be a list of parameter names, got {entries!r}")
    if entries and config.get("use_dora"):
        used.append("use_dora with target_parameters (DoRA on bare parameters, which PEFT's ParamWrapper refuses)")
    if entries and init in _RESIDUAL_INITS:
        used.append(f"init_lora_weights={init!r} with target_parameters (adaptune's LoRA on a mixture of experts "
                    f"starts from init='default' only)")
    if used:
        raise LoadError(f"{str(path)!r} uses PEFT options adaptune cannot represent: {'; '.join(used)}. "
                        f"Supported: LoRA or DoRA on Linear / Conv1D layers (LoRA on nn.Embedding, and on a mixture "
                        f"of experts' gate_up_proj / down_proj through target_parameters) with bias='none', "
                        f"use_rslora, "
                        f"init_lora_weights {', '.join(map(repr, _PLAIN_INITS + _RESIDUAL_INITS))}")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise LoadError(f"{str(path)!r}: r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise LoadError(f"{str(path)!r}: lora_alpha must be a positive number, got {alpha!r}")
    saved = config.get("modules_to_save") or []
    if not isinstance(saved, list) or not all(isinstance(n, str) and n for n in saved):
        raise LoadError(f"{str(path)!r}: modules_to_save must be a list of module names, got {saved!r}")
    for name in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(name) or {}, dict):
            raise LoadError(f"{str(path)!r}: {name} must be an object mapping module names to values")
    return config


def read_tensors(directory: Path) -> dict[str, Tensor]:
    """The adapter's tensors by PEFT's names without its "base_model.model." prefix."""
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        hint = (" (found adapter_model.bin: re-save with save_pretrained(..., safe_serialization=True))"
                if (directory / "adapter_model.bin").is_file() else "")
        raise LoadError(f"{str(directory)!r} has no {WEIGHTS_NAME}{hint}")
    from safetensors.torch import load_file
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise LoadError(f"cannot read {str(path)!r}: {e}") from e
    return {k.removeprefix(PREFIX): t for k, t in tensors.items()}  # PEFT's module paths (PREFIX once, here)


def split_saved(tensors: dict[str, Tensor], names: list[str]) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
    """(the LoRA tensors, PEFT module path -> state dict of each of its modules_to_save). A key belongs to the
    outermost module whose path is a configured name or ends with "." + one (PEFT's match)."""
    rest: dict[str, Tensor] = {}
    saved: dict[str, dict[str, Tensor]] = {}
    for name, tensor in tensors.items():
        parts = name.split(".")
        prefixes = [".".join(parts[:i]) for i in range(1, len(parts))]
        owner = next((p for p in prefixes if any(p == n or p.endswith("." + n) for n in names)), None)
        if owner is None or name.endswith(tuple(_PARTS)):
            rest[name] = tensor
        else:
            saved.setdefault(owner, {})[name[len(owner) + 1:]] = tensor
    return rest, saved


def split_keys(tensors: dict[str, Tensor], use_dora: bool, required: bool = True) -> dict[str, dict[str, Tensor]]:
    """PEFT module path -> {"A": (r, in), "B": (out, r), "magnitude": (out,) for DoRA}."""
    found: dict[str, dict[str, Tensor]] = {}
    for name, tensor in tensors.items():
        for suffix, part in _PARTS.items():
            if name.endswith(suffix):
                found.setdefault(name[:-len(suffix)], {})[part] = tensor
                break
        else:
            raise LoadError(f"unsupported tensor {PREFIX + name!r} in {WEIGHTS_NAME}: only lora_A / lora_B weights and "
                            f"DoRA's lora_magnitude_vector of Linear and Conv1D layers, and lora_embedding_A / "
                            f"lora_embedding_B of embeddings import (no LoRA biases; a module's own tensors import "
                            f"when modules_to_save names it)")
    if not found and required:
        raise LoadError(f"{WEIGHTS_NAME} holds no LoRA tensors")
    for path, parts in found.items():
        table = bool({"embedding_A", "embedding_B"} & set(parts))
        want = {"embedding_A", "embedding_B"} if table else {"A", "B"}
        want |= {"magnitude"} if use_dora else set()
        if set(parts) != want:
            missing = sorted(_LABEL[p] for p in want - set(parts))
            extra = sorted(_LABEL[p] for p in set(parts) - want)
            what = f"lacks {', '.join(missing)}" if missing else f"has {', '.join(extra)} but use_dora is false"
            raise LoadError(f"{WEIGHTS_NAME}: module {path!r} {what}")
    return found


def match_module(peft_path: str, modules: dict[str, nn.Module], model_name: str, table: bool = False) -> str:
    """The Linear / Conv1D module path (nn.Embedding for `table`) of this model for a PEFT module path
    (see find_module)."""
    path = find_module(peft_path, modules, model_name)
    module = modules[path]
    if table and not is_table(module):
        raise LoadError(f"PEFT module {peft_path!r} has lora_embedding_A / B, but {path!r} here is a "
                        f"{type(module).__name__}, not an nn.Embedding")
    if not table and not is_linear(module):
        raise LoadError(f"PEFT module {peft_path!r} is {path!r} here, a {type(module).__name__}; "
                        f"only LoRA on Linear and Conv1D layers imports (lora_embedding_A / B on nn.Embedding)")
    return path


def split_base_copies(tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
    """(the rest, PEFT module path -> {name: tensor}) for the `<path>.base_layer.<name>` keys."""
    rest: dict[str, Tensor] = {}
    copies: dict[str, dict[str, Tensor]] = {}
    for name, tensor in tensors.items():
        if _BASE_COPY in name:
            path, param = name.rsplit(_BASE_COPY, 1)
            copies.setdefault(path, {})[param] = tensor
        else:
            rest[name] = tensor
    return rest, copies


def check_base_copy(peft_path: str, path: str, modules: dict[str, nn.Module], state: dict[str, Tensor]) -> None:
    """A saved copy of a layer's base weights holds exactly this model's values (adaptune never changes them)."""
    own = modules[path].state_dict()
    for name, tensor in state.items():
        mine = own.get(name)
        if mine is None or tuple(mine.shape) != tuple(tensor.shape) or not torch.equal(
                tensor.to(mine.device, mine.dtype), mine):
            raise LoadError(f"{PREFIX}{peft_path}{_BASE_COPY}{name} (the base weights PEFT saves with an embedding "
                            f"LoRA) differs from {path}.{name} of this model; import onto the base model the adapter "
                            f"was trained on (with its vocabulary size), or load those weights into the model first")


def check_shapes(peft_path: str, path: str, module: nn.Module, parts: dict[str, Tensor], r: int) -> None:
    inp, out = linear_dims(module)
    expect = {"A": (r, inp), "B": (out, r), "magnitude": (out,)}
    for part, tensor in parts.items():
        if tuple(tensor.shape) != expect[part]:
            raise LoadError(f"{PREFIX}{peft_path}.{_LABEL[part]} has shape {tuple(tensor.shape)}, but {path!r} "
                            f"here is {type(module).__name__} {inp} -> {out} and the config gives r={r}: "
                            f"expected {expect[part]}")
    if r > min(inp, out):
        raise LoadError(f"{peft_path!r} has rank {r}, larger than its layer ({out}×{inp}); adaptune's LoRA needs "
                        f"r <= {min(inp, out)}")
