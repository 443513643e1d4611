"""Named sites of transformer architectures, selectors, and their resolution to concrete points.

A selector is `[layers.<range>.]<site>` with site one of SITES and range `3`, `0-7`, `0,2,5` or `*`,
or a raw module path of the model (`encoder.layer.0.attention.self.query`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from .errors import BindError, SiteError
from .points import (ATTENTION, ATTENTION_SUBLAYER, EMBED, FFN_SUBLAYER, PROJECTION, RAW_SUBLAYER, SUBLAYER, Point,
                     is_linear, linear_dims)

SITES = ("embed", "attn", "attn.q", "attn.k", "attn.v", "attn.o", "ffn", "ffn.up", "ffn.down")


@dataclass(frozen=True)
class Arch:
    """Where the sites of one architecture live, as paths inside a layer."""
    name: str
    layers: str
    q: str
    k: str
    v: str
    o: str
    up: str
    down: str
    attention: str
    fused_qkv: bool = False  # q, k, v are thirds of one projection (GPT-2's c_attn)


_BERT = Arch("bert", "encoder.layer", "attention.self.query", "attention.self.key", "attention.self.value",
             "attention.output.dense", "intermediate.dense", "output.dense", "attention.self")
_LLAMA = Arch("llama", "layers", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
              "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj", "self_attn")
ARCHS: dict[str, Arch] = {
    "gpt2": Arch("gpt2", "h", "attn.c_attn", "attn.c_attn", "attn.c_attn", "attn.c_proj",
                 "mlp.c_fc", "mlp.c_proj", "attn", fused_qkv=True),
    "bert": _BERT,
    "roberta": _BERT,
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
}


_SELECTOR = re.compile(r"^(?:layers\.(?P<range>[^.]+)\.)?(?P<site>[a-z]+(?:\.[a-z]+)?)$")
_ROLE_SITES = {
    PROJECTION: "attn (q, k, v), attn.q|k|v|o, ffn (up, down), ffn.up|down, or a Linear/Conv1D module path",
    SUBLAYER: "attn, ffn, or a Linear/Conv1D module path",
    ATTENTION: "attn",
    EMBED: "embed",
}


def _require_linear(module: nn.Module, path: str, what: str) -> None:
    if not is_linear(module):
        wrapped = (" (it wraps another layer: is the model already adapted, e.g. by PEFT? Call merge_and_unload() "
                   "on it, or attach to the base model)" if hasattr(module, "base_layer") else "")
        raise BindError(f"{what} cannot bind to {path!r}: it is a {type(module).__name__}, not a Linear or "
                        f"Conv1D layer{wrapped}")


class SiteMap:
    """Resolves selectors on one model to points."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        config = getattr(model, "config", None)
        self.model_type: str | None = getattr(config, "model_type", None)
        self.arch = ARCHS.get(self.model_type or "")
        self.modules = dict(model.named_modules())
        self.layers: list[nn.Module] = []
        if self.arch is not None:
            for name, module in self.modules.items():
                if (name == self.arch.layers or name.endswith("." + self.arch.layers)) and isinstance(module, nn.ModuleList):
                    self.layers = list(module)
                    break

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def describe(self) -> str:
        valid = ", ".join(SITES)
        return (f"valid selectors: {valid} (optionally as layers.N.<site>, layers.A-B.<site>, layers.A,B.<site>), "
                f"or a module path such as {self.example_path()!r}")

    def example_path(self) -> str:
        """A Linear/Conv1D module path of this model, for messages and help."""
        linears = [n for n, m in self.modules.items() if is_linear(m)]
        return linears[0] if linears else "encoder.layer.0.attention.self.query"

    def resolve(self, selector: str, role: str, what: str) -> list[Point]:
        """Points for `selector` in `role`; `what` names the component in errors."""
        if not isinstance(selector, str) or not selector:
            raise SiteError(f"a selector must be a non-empty string, got {selector!r}; {self.describe()}")
        if selector in self.modules and selector not in SITES:
            return [self._raw(selector, role, what)]
        match = _SELECTOR.match(selector)
        if not match or match["site"] not in SITES:
            raise SiteError(f"unknown site {selector!r}; {self.describe()}")
        site, layers = match["site"], match["range"]
        if self.arch is None:
            raise SiteError(f"model type {self.model_type!r} has no site map (known: {', '.join(sorted(ARCHS))}); "
                            f"name modules by path instead, e.g. {self.example_path()!r}")
        if site == "embed":
            if layers is not None:
                raise SiteError(f"'embed' has no layers; write 'embed', not {selector!r}")
            if role != EMBED:
                raise BindError(f"{what} cannot bind to 'embed'; it binds to {_ROLE_SITES[role]}")
            embed = self.model.get_input_embeddings()
            d = embed.embedding_dim
            return [Point(EMBED, "embed", "embed", None, embed, d, d, model=self.model)]
        return [p for i in self._layer_indices(layers, selector) for p in self._layer_points(i, site, role, what)]

    def _layer_indices(self, layers: str | None, selector: str) -> list[int]:
        n = self.n_layers
        if layers is None or layers == "*":
            return list(range(n))
        out: list[int] = []
        for part in layers.split(","):
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if not m:
                raise SiteError(f"bad layer range {layers!r} in {selector!r}; write N, A-B, A,B or *")
            lo, hi = int(m[1]), int(m[2] if m[2] is not None else m[1])
            if lo > hi:
                raise SiteError(f"layers {part} in {selector!r} is a reversed range; write {hi}-{lo}")
            if hi >= n:
                raise SiteError(f"layers {part} in {selector!r} out of range: this model has {n} layers (0-{n - 1})")
            out.extend(range(lo, hi + 1))
        return sorted(set(out))

    def _get(self, layer: int, path: str) -> nn.Module:
        module = self.layers[layer]
        for part in path.split("."):
            module = getattr(module, part)
        return module

    def _linear(self, layer: int, path: str, what: str) -> nn.Module:
        module = self._get(layer, path)
        _require_linear(module, f"layers.{layer}.{path}", what)
        return module

    def _layer_points(self, i: int, site: str, role: str, what: str) -> list[Point]:
        a = self.arch
        if role == PROJECTION:
            names = {"attn": ["q", "k", "v"], "ffn": ["up", "down"]}.get(site) or [site.split(".")[1]]
            return [self._projection(i, name, what) for name in names]
        if role == SUBLAYER and site in ("attn", "ffn"):
            inp, out = (a.q, a.o) if site == "attn" else (a.up, a.down)
            in_module, out_module = self._linear(i, inp, what), self._linear(i, out, what)
            position = ATTENTION_SUBLAYER if site == "attn" else FFN_SUBLAYER
            return [Point(SUBLAYER, f"layers:{i}:{site}", site, i, out_module, linear_dims(in_module)[0],
                          linear_dims(out_module)[1], in_module=in_module, position=position)]
        if role == ATTENTION and site == "attn":
            cfg = self.model.config
            heads = cfg.num_attention_heads
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
            kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
            d = kv_heads * head_dim
            return [Point(ATTENTION, f"layers:{i}:attn", "attn", i, self._get(i, a.attention), d, d,
                          n_kv_heads=kv_heads, head_dim=head_dim)]
        raise BindError(f"{what} cannot bind to {site!r}; it binds to {_ROLE_SITES[role]}")

    def _projection(self, i: int, name: str, what: str = "a component") -> Point:
        a = self.arch
        path = {"q": a.q, "k": a.k, "v": a.v, "o": a.o, "up": a.up, "down": a.down}[name]
        module = self._linear(i, path, what)
        inp, out = linear_dims(module)
        rows = None
        if a.fused_qkv and name in ("q", "k", "v"):
            part = out // 3
            j = "qkv".index(name)
            rows, out = slice(j * part, (j + 1) * part), part
        site = f"{'attn' if name in 'qkvo' else 'ffn'}.{name}"
        return Point(PROJECTION, f"layers:{i}:{site.replace('.', ':')}", site, i, module, inp, out, rows=rows)

    def _raw(self, path: str, role: str, what: str) -> Point:
        module = self.modules[path]
        key = "module:" + path.replace(".", ":")
        if role not in (PROJECTION, SUBLAYER):
            raise BindError(f"{what} cannot bind to module path {path!r}; it binds to {_ROLE_SITES[role]}")
        _require_linear(module, path, what)
        inp, out = linear_dims(module)
        if role == PROJECTION:
            return Point(PROJECTION, key, path, None, module, inp, out)
        return Point(SUBLAYER, key, path, None, module, inp, out, in_module=module, position=RAW_SUBLAYER)

    def table(self) -> list[tuple[str, str, int, int]]:
        """(site, module paths, layers, parameters per layer) for every named site (`adaptune inspect`)."""
        if self.arch is None or not self.layers:
            return []
        names = {id(m): n for n, m in self.modules.items()}
        embed = self.model.get_input_embeddings()
        rows = [("embed", names.get(id(embed), "?"), 0, embed.weight.numel())]
        counts: dict[str, int] = {}
        for name in ("q", "k", "v", "o", "up", "down"):
            p = self._projection(0, name)
            counts[p.site] = p.dim_out * (p.dim_in + (p.module.bias is not None))
        counts["attn"] = sum(counts[f"attn.{n}"] for n in "qkvo")
        counts["ffn"] = counts["ffn.up"] + counts["ffn.down"]
        for site in SITES[1:]:
            paths = [names[id(m)] for i in range(self.n_layers) for m in self._site_modules(i, site)]
            shown = paths[0] if len(paths) == 1 else f"{paths[0]} … {paths[-1]}"
            rows.append((site, shown, self.n_layers, counts[site]))
        return rows

    def _site_modules(self, i: int, site: str) -> list[nn.Module]:
        if site in ("attn", "ffn"):
            return [self._get(i, self.arch.attention if site == "attn" else self.arch.up)]
        return [self._projection(i, site.split(".")[1]).module]

