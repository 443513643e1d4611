"""Where the sites of an architecture live: exact maps for known model types, else found by structure.

Structure: the layer stack is the ModuleList of identical blocks whose first block holds q/k/v
projections (encoder-decoder models have two: not yet mapped); in its first block, attention is the child holding the q/k/v projections (by their usual names: `q_proj`,
`query`, `q_lin`, `q`; or one fused `c_attn` / `query_key_value` / `qkv_proj` / `Wqkv`), its output
projection the remaining attention Linear by name (`o_proj`, `out_proj`, `dense`, `out_lin`, `o`);
the feed-forward Linears are those outside every attention module (`up_proj` / `fc1` / `wi` ...,
`down_proj` / `fc2` / `wo` ..., `gate_proj`), else the first and last of them.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .points import is_linear


@dataclass(frozen=True)
class Arch:
    """Where the sites of one architecture live, as paths inside a layer."""
    name: str
    layers: str  # the layer stack's path (or its last parts)
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
_UP = ("up_proj", "fc1", "lin1", "c_fc", "intermediate.dense", "dense_h_to_4h", "gate_up_proj", "wi", "Wi", "fc_in")
_DOWN = ("down_proj", "fc2", "lin2", "c_proj", "output.dense", "dense_4h_to_h", "wo", "Wo", "fc_out")
_GATE = ("gate_proj",)


def _named(paths: list[str], names: tuple[str, ...]) -> str | None:
    """The first path whose last parts are one of `names`, in the order of `names`."""
    for name in names:
        for path in paths:
            if path == name or path.endswith("." + name):
                return path
    return None


def stacks(model: nn.Module) -> list[str]:
    """Paths of every layer stack that holds attention (several in encoder-decoder models)."""
    out = []
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(b) for b in module}) == 1:
            linears = [n for n, m in module[0].named_modules() if is_linear(m)]
            if _named(linears, _Q) or _named(linears, _QKV):
                if not any(path.startswith(p + ".") for p in out):
                    out.append(path)
    return out


def discover(model: nn.Module) -> tuple[Arch | None, str]:
    """(the structure found, "") or (None, why not)."""
    found = stacks(model)
    if len(found) > 1:
        return None, f"it has {len(found)} layer stacks ({', '.join(found)}); name modules by path"
    if not found:
        return None, "no stack of identical layers with attention projections was found"
    path = found[0]
    first = model.get_submodule(path)[0]
    linears = [n for n, m in first.named_modules() if is_linear(m)]
    q, qkv = _named(linears, _Q), None
    if q is None:
        qkv = _named(linears, _QKV)
        if qkv is None:
            return None, "no q / k / v projections were found in its layers"
    anchor = q or qkv
    attention = anchor.rpartition(".")[0]
    root = anchor.split(".")[0] if "." in anchor else ""
    inside = [n for n in linears if root and (n == root or n.startswith(root + "."))]
    k, v = (_named(inside, _K), _named(inside, _V)) if q else (qkv, qkv)
    o = _named([n for n in inside if n not in (q, k, v, qkv)], _O)
    attention_roots = {n.split(".")[0] for n in linears if _named([n], _Q + _QKV)}
    ffn = [n for n in linears if n.split(".")[0] not in attention_roots]
    gate = _named(ffn, _GATE)
    rest = [n for n in ffn if n != gate]
    up, down = _named(rest, _UP), _named(rest, _DOWN)
    if (up is None or down is None or up == down) and len(rest) >= 2:
        up, down = rest[0], rest[-1]
    missing = [name for name, p in (("k", k), ("v", v), ("o", o)) if p is None]
    if missing:
        return None, f"its attention has no {', '.join(missing)} projection that adaptune recognises"
    name = "found:" + type(first).__name__
    return Arch(name, path, q or qkv, k, v, o, up, down, attention, qkv=qkv, gate=gate), ""
