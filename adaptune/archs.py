"""Where the sites of an architecture live: exact maps for known model types, else found by structure.

Structure: a layer tower is a ModuleList of identical blocks whose first block holds q/k/v projections
(encoder-decoder models have two, named `encoder` and `decoder` by their paths). In a block, an
attention module is the parent of a q projection (by its usual names: `q_proj`, `query`, `q_lin`, `q`;
or of one fused `c_attn` / `query_key_value` / `qkv_proj` / `Wqkv`), with k and v inside it and its
output projection the remaining attention Linear by name (`o_proj`, `out_proj`, `dense`, `out_lin`,
`o`), inside it or else beside it in its parent (BERT's `attention.output.dense`). A second attention
module in a block is cross-attention (the one named like `encoder_attn`, `EncDecAttention`,
`crossattention`, else the later one). The feed-forward Linears are those outside every attention
(`up_proj` / `fc1` / `wi` ..., `down_proj` / `fc2` / `wo` ..., `gate_proj` / `wi_0`), else the first
and last of them. A mixture of experts is the module holding 3-D `gate_up_proj` and `down_proj` parameters
of one number of experts (transformers' fused experts); then the feed-forward has no Linear up / down
(a shared expert's Linears beside the experts are reached by path).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from .points import is_linear


@dataclass(frozen=True)
class Arch:
    """Where the sites of one architecture live, as paths inside a layer."""
    name: str
    layers: str  # the layer tower's path (or its last parts)
    q: str
    k: str
    v: str
    o: str
    up: str | None  # None: a feed-forward without Linear projections (experts)
    down: str | None
    attention: str  # the module that calls the attention interface
    fused_qkv: bool = False  # q, k, v are thirds of one projection (GPT-2's c_attn)
    qkv: str | None = None  # q, k, v are one fused projection laid out otherwise: bound whole
    gate: str | None = None  # the gate projection of a gated feed-forward
    cross: "Arch | None" = None  # cross-attention (q, k, v, o, attention; qkv if fused) of a decoder block
    experts: str | None = None  # the module holding a mixture of experts' fused weights (found by structure)


_BERT = Arch("bert", "encoder.layer", "attention.self.query", "attention.self.key", "attention.self.value",
             "attention.output.dense", "intermediate.dense", "output.dense", "attention.self")
_LLAMA = Arch("llama", "layers", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
              "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj", "self_attn", gate="mlp.gate_proj")
ARCHS: dict[str, Arch] = {
    "gpt2": Arch("gpt2", "h", "attn.c_attn", "attn.c_attn", "attn.c_attn", "attn.c_proj",
                 "mlp.c_fc", "mlp.c_proj", "attn", fused_qkv=True),
    "bert": _BERT,
    "roberta": _BERT,
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
}

_Q = ("q_proj", "query", "q_lin", "q")
_K = ("k_proj", "key", "k_lin", "k")
_V = ("v_proj", "value", "v_lin", "v")
_QKV = ("c_attn", "query_key_value", "qkv_proj", "Wqkv", "qkv")
_O = ("o_proj", "out_proj", "out_lin", "output.dense", "dense", "c_proj", "o", "Wo")
_UP = ("up_proj", "fc1", "lin1", "c_fc", "intermediate.dense", "dense_h_to_4h", "gate_up_proj", "wi", "wi_1", "Wi",
       "fc_in")
_DOWN = ("down_proj", "fc2", "lin2", "c_proj", "output.dense", "dense_4h_to_h", "wo", "Wo", "fc_out")
_GATE = ("gate_proj", "wi_0")
_CROSS = ("cross", "encdec", "encoder_attn")  # how cross-attention modules are named (lower case)


def _named(paths: list[str], names: tuple[str, ...]) -> str | None:
    """The first path whose last parts are one of `names`, in the order of `names`."""
    for name in names:
        for path in paths:
            if path == name or path.endswith("." + name):
                return path
    return None


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root + ".")


def towers(model: nn.Module) -> list[str]:
    """Paths of every layer tower that holds attention (several in encoder-decoder models)."""
    out = []
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(b) for b in module}) == 1:
            linears = [n for n, m in module[0].named_modules() if is_linear(m)]
            if _named(linears, _Q) or _named(linears, _QKV):
                if not any(_under(path, p) for p in out):
                    out.append(path)
    return out


def tower_names(paths: list[str]) -> list[str | None] | None:
    """None for the one tower of most models; `encoder`, `decoder` for the two of an encoder-decoder
    model (by the parts of their paths); None when the towers cannot be told apart."""
    if len(paths) == 1:
        return [None]
    names = ["encoder" if "encoder" in p.split(".") else "decoder" if "decoder" in p.split(".") else None
             for p in paths]
    return names if sorted(map(str, names)) == ["decoder", "encoder"] else None


def discover(model: nn.Module) -> tuple[list[tuple[str | None, Arch]], str]:
    """([(tower name, structure)] for every layer tower, "") or ([], why not)."""
    found = towers(model)
    if not found:
        return [], "no tower of identical layers with attention projections was found"
    names = tower_names(found)
    if names is None:
        return [], f"it has {len(found)} layer towers ({', '.join(found)}) that are not an encoder and a decoder; " \
                   f"name modules by path"
    out = []
    for name, path in zip(names, found):
        blocks = model.get_submodule(path)
        arch, why = _block(path, blocks[0], experts_path(blocks))
        if arch is None:
            return [], why if name is None else f"its {name}: {why}"
        out.append((name, arch))
    return out, ""


def _attention(linears: list[str], anchor: str, fused: bool, others: list[str]) -> tuple[Arch | None, str, str]:
    """(q, k, v, o of the attention around `anchor` as an Arch without feed-forward, the module it lives in
    with its output projection, why not); `others` are the block's other attention modules."""
    module = anchor.rpartition(".")[0]
    inside = [n for n in linears if _under(n, module)]
    q, qkv = (None, anchor) if fused else (anchor, None)
    k, v = (qkv, qkv) if fused else (_named(inside, _K), _named(inside, _V))
    o, container = _named([n for n in inside if n not in (q, k, v, qkv)], _O), module
    if o is None and "." in module:  # beside it: BERT's attention.self.query, attention.output.dense
        container = module.rpartition(".")[0]
        near = [n for n in linears if _under(n, container) and not _under(n, module)
                and not any(_under(n, other) for other in others)]
        o = _named(near, _O)
    missing = [name for name, p in (("k", k), ("v", v), ("o", o)) if p is None]
    if missing:
        return None, "", f"its attention has no {', '.join(missing)} projection that adaptune recognises"
    return Arch("", "", q or qkv, k, v, o, None, None, module, qkv=qkv), container, ""


def is_experts(module: nn.Module) -> bool:
    """Whether `module` holds a mixture of experts' fused weights: 3-D `gate_up_proj` and `down_proj` parameters
    with one number of experts."""
    params = dict(module.named_parameters(recurse=False))
    gate_up, down = params.get("gate_up_proj"), params.get("down_proj")
    return (isinstance(gate_up, Tensor) and isinstance(down, Tensor) and gate_up.dim() == 3 and down.dim() == 3
            and gate_up.shape[0] == down.shape[0])


def experts_path(blocks: nn.ModuleList) -> str | None:
    """The path inside a layer of its experts module, from the first layer that has one (some models mix dense
    and sparse layers)."""
    for block in blocks:
        found = next((n for n, m in block.named_modules() if n and is_experts(m)), None)
        if found is not None:
            return found
    return None


def experts_layout(module: nn.Module) -> str | None:
    """None when the experts compute transformers' Mixtral layout, which expert LoRA supports: gate_up_proj
    (E, 2I, H) with gate then up concatenated, down_proj (E, H, I), no biases, act_fn(gate) · up; else why not."""
    name = type(module).__name__
    gate_up, down = module.gate_up_proj, module.down_proj
    biases = sorted(n for n, _ in module.named_parameters(recurse=False) if "bias" in n)
    flags = {"is_transposed": False, "is_concatenated": True, "has_bias": False, "has_gate": True,
             "has_post_expert_norm": False}
    odd = [f"{flag}={getattr(module, flag)!r}" for flag, want in flags.items()
           if getattr(module, flag, want) != want]
    if getattr(module, "_is_expert_parallel", False):
        odd.append("expert parallel")
    gate = getattr(type(module), "_apply_gate", None)
    if gate is not None and getattr(gate, "__name__", "") != "_default_apply_gate":
        odd.append("its own _apply_gate (not act_fn(gate) · up)")
    if not callable(getattr(module, "act_fn", None)):
        odd.append("no act_fn")
    E, two_i, h = gate_up.shape
    if tuple(down.shape) != (E, h, two_i // 2) or two_i % 2:
        odd.append(f"gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)} are not (E, 2I, H) and "
                   f"(E, H, I)")
    if biases:
        odd.append(f"biases ({', '.join(biases)})")
    if not odd:
        return None
    return (f"{name} stores its experts in a layout expert LoRA does not support: {'; '.join(odd)} (supported: "
            f"transformers' Mixtral layout, gate_up_proj (E, 2I, H) as [gate; up], down_proj (E, H, I), no biases, "
            f"act_fn(gate) · up, as Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE have)")


def _block(path: str, first: nn.Module, experts: str | None = None) -> tuple[Arch | None, str]:
    linears = [n for n, m in first.named_modules() if is_linear(m)]
    last = {n: n.rsplit(".", 1)[-1] for n in linears}
    fused = not any(last[n] in _Q for n in linears)
    anchors = [n for n in linears if last[n] in (_QKV if fused else _Q)]
    if not anchors:
        return None, "no q / k / v projections were found in its layers"
    modules = [a.rpartition(".")[0] for a in anchors]
    if len(set(modules)) != len(modules) or len(modules) > 2:
        return None, f"its layers have {len(modules)} q projections ({', '.join(anchors)}); name modules by path"
    if len(anchors) == 2 and any(h in modules[0].lower() for h in _CROSS):
        anchors.reverse()  # self-attention first
    found, containers = [], []
    for anchor in anchors:
        others = [m for m in modules if m != anchor.rpartition(".")[0]]
        attention, container, why = _attention(linears, anchor, fused, others)
        if attention is None:
            return None, why
        found.append(attention)
        containers.append(container)
    ffn = [n for n in linears if not any(_under(n, c) for c in containers if c)]
    gate = _named(ffn, _GATE)
    rest = [n for n in ffn if n != gate]
    up, down = _named(rest, _UP), _named(rest, _DOWN)
    if (up is None or down is None or up == down) and len(rest) >= 2:
        up, down = rest[0], rest[-1]
    if experts is not None:  # a mixture of experts: its Linears (a shared expert) are not the feed-forward
        up = down = gate = None
    a = found[0]
    return Arch("found:" + type(first).__name__, path, a.q, a.k, a.v, a.o, up, down, a.attention, qkv=a.qkv,
                gate=gate, cross=found[1] if len(found) > 1 else None, experts=experts), ""
