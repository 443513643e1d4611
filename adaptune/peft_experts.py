"""Importing LoRA on a mixture of experts' fused weights from PEFT (target_parameters naming
`<experts>.gate_up_proj` / `.down_proj`, PEFT's ParamWrapper: see peft_export for the layout) as LoRA on
'layers.N.ffn.experts.gate_up' / '.down' (experts="each"): the entries checked against this model's experts,
the wrappers' lora_A / lora_B found whatever `.base_layer` nesting their keys carry, each told apart by its shapes
(lora_A (E·r, in), lora_B (out, r·E): gate_up's (H, 2I) and down's (I, H) never coincide) and reshaped into
adaptune's (E, r, in) / (E, out, r) factors."""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .archs import experts_layout, is_experts
from .components.lora import LoRA
from .errors import AdaptuneError, LoadError
from .peft_export import CONFIG_NAME, PREFIX, WEIGHTS_NAME
from .peft_names import find_module, matches, pattern_value
from .points import EXPERT_PARTS
from .sites import SiteMap

_EXPERT_PARAMS = tuple(f"{part}_proj" for part in EXPERT_PARTS)  # ("gate_up_proj", "down_proj")
_FACTORS = {".lora_A.weight": "A", ".lora_B.weight": "B"}


def _names_match(name: str, entry: str) -> bool:
    """PEFT's match of a target_parameters entry against a parameter path (`name == entry` or a suffix of it),
    either way round, as module paths match (find_module)."""
    return name == entry or name.endswith("." + entry) or entry.endswith("." + name)


def expert_targets(entries: list[str], modules: dict[str, nn.Module], model_name: str) -> dict[str, set[str]]:
    """Experts module path -> its parameters that target_parameters names; every entry must name gate_up_proj /
    down_proj of a mixture of experts of this model that adaptune's expert LoRA supports."""
    targets: dict[str, set[str]] = {}
    for entry in entries:
        found = [(path, module, param) for path, module in modules.items()
                 for param, _ in module.named_parameters(recurse=False) if _names_match(f"{path}.{param}", entry)]
        if not found:
            raise LoadError(f"{CONFIG_NAME}: target_parameters entry {entry!r} matches no parameter of this "
                            f"{model_name}")
        for path, module, param in found:
            if param not in _EXPERT_PARAMS or not is_experts(module):
                shape = tuple(getattr(module, param).shape)
                raise LoadError(f"{CONFIG_NAME}: target_parameters entry {entry!r} names {path}.{param} here "
                                f"({type(module).__name__}, shape {shape}), which is not a mixture of experts' "
                                f"gate_up_proj / down_proj; adaptune imports LoRA on bare parameters only there "
                                f"(as LoRA on 'ffn.experts.gate_up' / 'ffn.experts.down')")
            why = experts_layout(module)
            if why is not None:
                raise LoadError(f"{CONFIG_NAME}: target_parameters entry {entry!r} names {path}.{param}: {why}")
            targets.setdefault(path, set()).add(param)
    return targets


def split_experts(tensors: dict[str, Tensor], modules: dict[str, nn.Module], targets: dict[str, set[str]]
                  ) -> tuple[dict[str, Tensor], dict[str, dict[int, dict[str, Tensor]]]]:
    """(the rest, PEFT experts module path -> nesting depth -> {"A", "B"}): the lora_A / lora_B weights of the
    ParamWrappers on the experts modules in `targets` (keys `<path>[.base_layer]*.lora_A.weight`)."""
    rest: dict[str, Tensor] = {}
    found: dict[str, dict[int, dict[str, Tensor]]] = {}
    for name, tensor in tensors.items():
        suffix = next((s for s in _FACTORS if name.endswith(s)), None)
        if targets and suffix is not None:
            parts = name[:-len(suffix)].split(".")
            peft_path = ".".join(p for p in parts if p != "base_layer")
            here = matches(peft_path, modules)
            if len(here) == 1 and here[0] in targets:
                found.setdefault(peft_path, {}).setdefault(len(parts) - len(peft_path.split(".")), {})[
                    _FACTORS[suffix]] = tensor
                continue
        rest[name] = tensor
    return rest, found


def _experts_points(model: nn.Module) -> dict[int, tuple[str, str]]:
    """id(experts module) -> (its selector 'layers.N.ffn.experts', the key of its points without the part)."""
    out = {}
    for tower in SiteMap(model).towers:
        path = tower.arch.experts
        for i, block in enumerate(tower.layers if path is not None else []):
            try:
                module = block.get_submodule(path)
            except AttributeError:
                continue
            out[id(module)] = (f"{tower.site('layers')}.{i}.ffn.experts", tower.key(i, "ffn.experts"))
    return out


def add_experts(out: Any, model: nn.Module, config: dict[str, Any], experts: dict[str, dict[int, dict[str, Tensor]]],
                modules: dict[str, nn.Module], targets: dict[str, set[str]]) -> None:
    """Add to `out` (peft_import's Plan) a LoRA (experts="each") per ParamWrapper of `experts`, in adaptune's
    layout."""
    points = _experts_points(model)
    for peft_path, wrappers in experts.items():
        path = find_module(peft_path, modules, type(model).__name__)
        module = modules[path]
        if id(module) not in points:
            raise LoadError(f"{peft_path!r} holds LoRA on a mixture of experts, but {path!r} here is not the experts "
                            f"module of a layer adaptune's site map finds (expert LoRA binds to 'layers.N.ffn.experts')")
        selector, key = points[id(module)]
        E, two_i, h = module.gate_up_proj.shape
        dims = {"gate_up_proj": (h, two_i), "down_proj": (two_i // 2, h)}  # (in, out) of one expert
        seen: dict[str, int] = {}
        for depth, parts in sorted(wrappers.items()):
            what = f"{PREFIX}{peft_path}{'.base_layer' * depth}"
            for part in sorted({"A", "B"} - set(parts)):
                raise LoadError(f"{WEIGHTS_NAME}: {what} lacks lora_{part}.weight")
            A, B = parts["A"], parts["B"]
            shapes = f"lora_A.weight {tuple(A.shape)} and lora_B.weight {tuple(B.shape)}"
            param = next((p for p, (d_in, d_out) in dims.items()
                          if A.dim() == B.dim() == 2 and A.shape[1] == d_in and B.shape[0] == d_out), None)
            if param is None:
                raise LoadError(f"{what} has {shapes}, which fit neither weight of {path!r} here ({E} experts: "
                                f"gate_up_proj {h} -> {two_i}, down_proj {two_i // 2} -> {h}; expected lora_A "
                                f"(E·r, in), lora_B (out, r·E))")
            if param in seen:
                raise LoadError(f"{WEIGHTS_NAME}: {peft_path!r} holds two LoRAs on {param}")
            seen[param] = depth
            if param not in targets[path]:
                raise LoadError(f"{what} is a LoRA on {param}, which target_parameters does not name")
            name = f"{peft_path}.{param}"  # what PEFT matches rank_pattern / alpha_pattern keys against
            r = pattern_value(config.get("rank_pattern"), name, config["r"], "rank_pattern")
            alpha = pattern_value(config.get("alpha_pattern"), name, config["lora_alpha"], "alpha_pattern")
            d_in, d_out = dims[param]
            if tuple(A.shape) != (E * r, d_in) or tuple(B.shape) != (d_out, r * E):
                raise LoadError(f"{what} has {shapes}, but {param} of {path!r} here has {E} experts of {d_in} -> "
                                f"{d_out} and the config gives r={r}: expected {(E * r, d_in)} and {(d_out, r * E)}")
            if r > min(d_in, d_out):
                raise LoadError(f"{name!r} has rank {r}, larger than one expert's {param} ({d_out}×{d_in}); "
                                f"adaptune's LoRA needs r <= {min(d_in, d_out)}")
            try:
                component = LoRA(r=r, alpha=alpha, dropout=config.get("lora_dropout") or 0.0,
                                 rslora=bool(config.get("use_rslora", False)))
            except AdaptuneError as e:
                raise LoadError(f"{CONFIG_NAME} for {name!r}: {e}") from e
            part = param.removesuffix("_proj")
            factors = {"A": A.reshape(E, r, d_in),  # expert-major rows
                       "B": B.reshape(d_out, r, E).permute(2, 0, 1).contiguous()}  # column j·E + e: B_e[:, j]
            out.add(name, f"{selector}.{part}", component, factors, point=f"{key}:{part}")
