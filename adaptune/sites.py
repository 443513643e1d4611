"""Named sites of transformer architectures, selectors, and their resolution to concrete points.

A selector is `[layers.<range>.]<site>` with site one of SITES and range `3`, `0-7`, `0,2,5` or `*`,
or a raw module path of the model (`encoder.layer.0.attention.self.query`).
"""
from __future__ import annotations

import re
from torch import nn

from .archs import ARCHS, discover
from .errors import BindError, SiteError
from .points import (ATTENTION, ATTENTION_SUBLAYER, EMBED, FFN_SUBLAYER, MODULE, PROJECTION, RAW_SUBLAYER, SUBLAYER,
                     Point, is_linear, linear_dims)

SITES = ("embed", "attn", "attn.q", "attn.k", "attn.v", "attn.o", "ffn", "ffn.up", "ffn.down", "ffn.gate")


_SELECTOR = re.compile(r"^(?:layers\.(?P<range>[^.]+)\.)?(?P<site>[a-z]+(?:\.[a-z]+)?)$")
_ROLE_SITES = {
    PROJECTION: "attn (q, k, v), attn.q|k|v|o, ffn (up, down), ffn.up|down|gate, embed, or a Linear/Conv1D/"
                "Embedding module path",
    SUBLAYER: "attn, ffn, or a Linear/Conv1D module path",
    ATTENTION: "attn, or an attention module path",
    EMBED: "embed, or an nn.Embedding path",
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
        self.why_not = ""  # why no site map was found
        if self.arch is None:
            self.arch, self.why_not = discover(model)
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
        if role == MODULE:  # a module trained as a whole: any module path (or pattern)
            patterned = "*" in selector or selector.startswith("re:")
            return [self._module_point(p, what) for p in (self._matching(selector) if patterned else [selector])]
        if selector in self.modules and selector not in SITES:
            return [self._raw(selector, role, what)]
        match = _SELECTOR.match(selector)
        if (not match or match["site"] not in SITES) and ("*" in selector or selector.startswith("re:")):
            return [self._raw(path, role, what) for path in self._matching(selector)]
        if not match or match["site"] not in SITES:
            raise SiteError(f"unknown site {selector!r}; {self.describe()}")
        site, layers = match["site"], match["range"]
        if self.arch is None:
            raise SiteError(f"no site map for model type {self.model_type!r}: {self.why_not} (exact maps: "
                            f"{', '.join(sorted(ARCHS))}); name modules by path instead, e.g. {self.example_path()!r}")
        if site == "embed":
            if layers is not None:
                raise SiteError(f"'embed' has no layers; write 'embed', not {selector!r}")
            if role not in (EMBED, PROJECTION):
                raise BindError(f"{what} cannot bind to 'embed'; it binds to {_ROLE_SITES[role]}")
            return [self._embedding(self.model.get_input_embeddings(), "embed", "embed", role, what)]
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
            names = {"attn": ["qkv"] if a.qkv else ["q", "k", "v"], "ffn": ["up", "down"]}.get(site) \
                or [site.split(".")[1]]
            return [self._projection(i, name, what) for name in names]
        if role == SUBLAYER and site in ("attn", "ffn"):
            inp, out = (a.q, a.o) if site == "attn" else (a.up, a.down)
            if inp is None or out is None:
                self._no_ffn(what)
            in_module, out_module = self._linear(i, inp, what), self._linear(i, out, what)
            position = ATTENTION_SUBLAYER if site == "attn" else FFN_SUBLAYER
            return [Point(SUBLAYER, f"layers:{i}:{site}", site, i, out_module, linear_dims(in_module)[0],
                          linear_dims(out_module)[1], in_module=in_module, position=position)]
        if role == ATTENTION and site == "attn":
            return [self._attention_point(f"layers:{i}:attn", "attn", i, self._get(i, a.attention))]
        raise BindError(f"{what} cannot bind to {site!r}; it binds to {_ROLE_SITES[role]}")

    def _no_ffn(self, what: str) -> None:
        experts = [type(m).__name__ for m in self.layers[0].modules() if "expert" in type(m).__name__.lower()]
        kind = f" (a mixture of experts: {experts[0]})" if experts else ""
        raise BindError(f"{what}: this model's feed-forward has no Linear up/down projections{kind}; "
                        f"bind to attention sites, or name modules by path")

    def _projection(self, i: int, name: str, what: str = "a component") -> Point:
        a = self.arch
        if a.qkv and name in ("q", "k", "v"):
            raise BindError(f"{what}: q, k and v are one fused projection in this model "
                            f"(layers.{i}.{a.qkv}); bind to 'attn' to adapt it whole")
        path = {"q": a.q, "k": a.k, "v": a.v, "qkv": a.qkv, "o": a.o, "up": a.up, "down": a.down,
                "gate": a.gate}[name]
        if path is None:
            if name == "gate":
                raise BindError(f"{what}: this model's feed-forward has no gate projection; "
                                f"its sites: ffn.up, ffn.down")
            self._no_ffn(what)
        module = self._linear(i, path, what)
        inp, out = linear_dims(module)
        rows = None
        if a.fused_qkv and name in ("q", "k", "v"):
            part = out // 3
            j = "qkv".index(name)
            rows, out = slice(j * part, (j + 1) * part), part
        site = f"{'attn' if name in 'qkvo' else 'ffn'}.{name}"
        return Point(PROJECTION, f"layers:{i}:{site.replace('.', ':')}", site, i, module, inp, out, rows=rows)

    def _attention_point(self, key: str, site: str, layer: int | None, module: nn.Module) -> Point:
        """Heads from the model's config: n_kv_heads of head_dim (grouped-query models have fewer kv heads)."""
        cfg = getattr(module, "config", None) or getattr(self.model, "config", None)
        if cfg is None or not hasattr(cfg, "num_attention_heads"):
            raise BindError(f"prefix tuning at {site}: no config with num_attention_heads to size its keys and values")
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        d = kv_heads * head_dim
        return Point(ATTENTION, key, site, layer, module, d, d, n_kv_heads=kv_heads, head_dim=head_dim)

    def _module_point(self, path: str, what: str) -> Point:
        if path not in self.modules or not path or path.split(".")[0] == "adaptune":
            heads = [n for n in self.modules if n and "." not in n and n != "adaptune"]
            raise SiteError(f"{what} binds to a module path of the model (the module trained as a whole, e.g. a "
                            f"classification head); {path!r} is none. Top-level modules: {', '.join(heads[:8])}")
        module = self.modules[path]
        inp, out = linear_dims(module) if is_linear(module) else (0, 0)
        return Point(MODULE, "module:" + path.replace(".", ":"), path, None, module, inp, out)

    def _matching(self, pattern: str) -> list[str]:
        """Module paths matching `pattern`: `*` stands for one path part (`model.layers.*.mlp.gate_proj`);
        `re:<regex>` must match a whole path."""
        try:
            regex = re.compile(pattern[3:] if pattern.startswith("re:") else
                               "[^.]+".join(map(re.escape, pattern.split("*"))))
        except re.error as e:
            raise SiteError(f"bad regular expression in {pattern!r}: {e}") from e
        paths = [n for n in self.modules if n and regex.fullmatch(n) and not n.startswith("adaptune")]
        if not paths:
            raise SiteError(f"{pattern!r} matches no module of this model; e.g. {self.example_path()!r}")
        return paths

    def _raw(self, path: str, role: str, what: str) -> Point:
        module = self.modules[path]
        key = "module:" + path.replace(".", ":")
        if role == ATTENTION:
            return self._attention_point(key, path, None, module)
        if role == EMBED or (role == PROJECTION and isinstance(module, nn.Embedding)):
            return self._embedding(module, key, path, role, what)
        if role not in (PROJECTION, SUBLAYER):
            raise BindError(f"{what} cannot bind to module path {path!r}; it binds to {_ROLE_SITES[role]}")
        _require_linear(module, path, what)
        inp, out = linear_dims(module)
        if role == PROJECTION:
            return Point(PROJECTION, key, path, None, module, inp, out)
        return Point(SUBLAYER, key, path, None, module, inp, out, in_module=module, position=RAW_SUBLAYER)

    def _embedding(self, module: nn.Module, key: str, site: str, role: str, what: str) -> Point:
        """An embedding table: prompt tuning prepends rows of its output (EMBED); a low-rank update of its
        (num_embeddings, dim) table is a PROJECTION point with dim_in the number of rows."""
        if not isinstance(module, nn.Embedding):
            raise BindError(f"{what} cannot bind to {site!r}: it is a {type(module).__name__}, not an "
                            f"nn.Embedding (prompt tuning prepends rows of the input embedding)")
        if role == PROJECTION:
            return Point(PROJECTION, key, site, None, module, module.num_embeddings, module.embedding_dim)
        d = module.embedding_dim
        return Point(EMBED, key, site, None, module, d, d, model=self.model)

    def table(self) -> list[tuple[str, str, int, int]]:
        """(site, module paths, layers, parameters per layer) for every site this model has (`adaptune inspect`)."""
        if self.arch is None or not self.layers:
            return []
        names = {id(m): n for n, m in self.modules.items()}
        embed = self.model.get_input_embeddings()
        rows = [("embed", names.get(id(embed), "?"), 0, embed.weight.numel())] if embed is not None else []
        for site in SITES[1:]:
            try:
                per_layer = [self._layer_points(i, site, PROJECTION, "a component") for i in range(self.n_layers)]
            except BindError:
                continue  # a site this model does not have (a gate, q alone in a fused projection)
            modules = {id(p.module): p.module for points in per_layer for p in points}
            paths = [names[id(m)] for m in modules.values()]
            shown = paths[0] if len(paths) == 1 else f"{paths[0]} … {paths[-1]}"
            count = sum(p.dim_out * (p.dim_in + (p.module.bias is not None)) for p in per_layer[0])
            rows.append((site, shown, self.n_layers, count))
        return rows
