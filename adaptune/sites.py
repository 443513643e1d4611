"""Named sites of transformer architectures, selectors, and their resolution to concrete points.

A selector is `[<tower>.][layers.<range>.]<site>` with site one of SITES and range `3`, `0-7`, `0,2,5`
or `*`, or a raw module path of the model (`encoder.layer.0.attention.self.query`), or a pattern of
paths (`model.layers.*.mlp.gate_proj`, `re:<regex>`). Encoder-decoder models have two layer towers,
`encoder` and `decoder`: `encoder.layers.0-5.attn`, `decoder.cross_attn`; a selector without a tower
means every tower that has the site (`attn`: both towers' self-attention), its layer range counted
in each.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from .archs import ARCHS, Arch, discover, experts_layout, is_experts
from .errors import BindError, SiteError
from .points import (ATTENTION, ATTENTION_SUBLAYER, CROSS_SUBLAYER, EMBED, EXPERT_PARTS, EXPERTS, FFN_SUBLAYER,
                     MODULE, PROJECTION, RAW_SUBLAYER, SUBLAYER, Point, is_linear, linear_dims)

SITES = ("embed", "attn", "attn.q", "attn.k", "attn.v", "attn.o", "ffn", "ffn.up", "ffn.down", "ffn.gate",
         "ffn.experts", "ffn.experts.gate_up", "ffn.experts.down",
         "cross_attn", "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o")
STACKS = ("encoder", "decoder")


_SELECTOR = re.compile(r"^(?:(?P<tower>encoder|decoder)\.)?(?:layers\.(?P<range>[^.]+)\.)?"
                       r"(?P<site>[a-z_]+(?:\.[a-z_]+){0,2})$")
_KIND_SITES = {
    PROJECTION: "attn (q, k, v), attn.q|k|v|o, ffn (up, down), ffn.up|down|gate, ffn.experts[.gate_up|down] (LoRA), "
                "cross_attn[.q|k|v|o], embed, or a Linear/Conv1D/Embedding module path",
    SUBLAYER: "attn, ffn, cross_attn, or a Linear/Conv1D module path",
    ATTENTION: "attn, cross_attn, or an attention module path",
    EMBED: "embed, or an nn.Embedding path",
}


def _require_linear(module: nn.Module, path: str, what: str) -> None:
    if not is_linear(module):
        wrapped = (" (it wraps another layer: is the model already adapted, e.g. by PEFT? Call merge_and_unload() "
                   "on it, or attach to the base model)" if hasattr(module, "base_layer") else "")
        raise BindError(f"{what} cannot bind to {path!r}: it is a {type(module).__name__}, not a Linear or "
                        f"Conv1D layer{wrapped}")


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root + ".")


def _has(block: nn.Module, path: str) -> bool:
    """Whether `block` holds an experts module at `path` (a dense layer of a mixed model does not)."""
    try:
        return is_experts(block.get_submodule(path))
    except AttributeError:
        return False


@dataclass(frozen=True, eq=False)
class Tower:
    """One tower of layers: its name (`encoder` / `decoder`; None in a model with one tower), the paths of its
    sites inside a layer, its layers, and the index of its first layer among all the model's layers."""
    name: str | None
    arch: Arch
    layers: list[nn.Module]
    offset: int

    def key(self, layer: int, site: str) -> str:
        """The point key of `site` in `layer`: "layers:3:attn:q", "decoder:layers:3:cross_attn:q"."""
        return f"{self.name + ':' if self.name else ''}layers:{layer}:{site.replace('.', ':')}"

    def site(self, site: str) -> str:
        return f"{self.name}.{site}" if self.name else site


class SiteMap:
    """Resolves selectors on one model to points."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        config = getattr(model, "config", None)
        self.model_type: str | None = getattr(config, "model_type", None)
        self.modules = dict(model.named_modules())
        self.why_not = ""  # why no site map was found
        exact = ARCHS.get(self.model_type or "")
        found = [(None, exact)] if exact is not None else None
        if found is None:
            found, self.why_not = discover(model)
        self.towers: list[Tower] = []
        for name, arch in found:
            layers = next((list(m) for n, m in self.modules.items() if isinstance(m, nn.ModuleList)
                           and (n == arch.layers or n.endswith("." + arch.layers))), [])
            self.towers.append(Tower(name, arch, layers, self.n_layers))

    @property
    def arch(self) -> Arch | None:
        """The structure of the (first) layer tower; None when no site map was found."""
        return self.towers[0].arch if self.towers else None

    @property
    def n_layers(self) -> int:
        """Layers in all towers."""
        return sum(len(s.layers) for s in self.towers)

    def describe(self) -> str:
        valid = ", ".join(SITES)
        towers = (" with a tower in front (" + ", ".join(f"{s.name}.<site>" for s in self.towers) + ")"
                  if len(self.towers) > 1 else "")
        return (f"valid selectors: {valid} (optionally as layers.N.<site>, layers.A-B.<site>, layers.A,B.<site>"
                f"{towers}), or a module path such as {self.example_path()!r}")

    def example_path(self) -> str:
        """A Linear/Conv1D module path of this model, for messages and help."""
        linears = [n for n, m in self.modules.items() if is_linear(m)]
        return linears[0] if linears else "encoder.layer.0.attention.self.query"

    def resolve(self, selector: str, kind: str, what: str) -> list[Point]:
        """Points for `selector` in `kind`; `what` names the component in errors."""
        if not isinstance(selector, str) or not selector:
            raise SiteError(f"a selector must be a non-empty string, got {selector!r}; {self.describe()}")
        if kind == MODULE:  # a module trained as a whole: any module path (or pattern)
            patterned = "*" in selector or selector.startswith("re:")
            return [self._module_point(p, what) for p in (self._matching(selector) if patterned else [selector])]
        if selector in self.modules and selector not in SITES:
            return [self._raw(selector, kind, what)]
        match = _SELECTOR.match(selector)
        if (not match or match["site"] not in SITES) and ("*" in selector or selector.startswith("re:")):
            return [self._raw(path, kind, what) for path in self._matching(selector)]
        if not match or match["site"] not in SITES:
            raise SiteError(f"unknown site {selector!r}; {self.describe()}")
        site, layers = match["site"], match["range"]
        if not self.towers:
            raise SiteError(f"no site map for model type {self.model_type!r}: {self.why_not} (exact maps: "
                            f"{', '.join(sorted(ARCHS))}); name modules by path instead, e.g. {self.example_path()!r}")
        if site == "embed":
            if layers is not None or match["tower"]:
                raise SiteError(f"'embed' has no layers or tower; write 'embed', not {selector!r}")
            if kind not in (EMBED, PROJECTION):
                raise BindError(f"{what} cannot bind to 'embed'; it binds to {_KIND_SITES[kind]}")
            return [self._embedding(self.model.get_input_embeddings(), "embed", "embed", kind, what)]
        towers = self._towers(match["tower"], selector)
        if site.startswith("cross_attn"):
            towers = [s for s in towers if s.arch.cross is not None]
            if not towers:
                where = f"its {match['tower']}" if match["tower"] else "this model"
                raise SiteError(f"{where} has no cross-attention (only decoders of encoder-decoder models have "
                                f"it); its sites: attn, ffn and their projections")
        return [p for tower in towers for i in self._layer_indices(tower, layers, selector)
                for p in self._layer_points(tower, i, site, kind, what)]

    def _towers(self, name: str | None, selector: str) -> list[Tower]:
        if name is None:
            return self.towers
        if len(self.towers) == 1:
            bare = selector.split(".", 1)[1]
            raise SiteError(f"{selector!r} names a layer tower, but this model has one; write {bare!r}")
        return [s for s in self.towers if s.name == name]

    def _layer_indices(self, tower: Tower, layers: str | None, selector: str) -> list[int]:
        n = len(tower.layers)
        if layers is None or layers == "*":
            return list(range(n))
        where = f"its {tower.name}" if tower.name else "this model"
        out: list[int] = []
        for part in layers.split(","):
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if not m:
                raise SiteError(f"bad layer range {layers!r} in {selector!r}; write N, A-B, A,B or *")
            lo, hi = int(m[1]), int(m[2] if m[2] is not None else m[1])
            if lo > hi:
                raise SiteError(f"layers {part} in {selector!r} is a reversed range; write {hi}-{lo}")
            if hi >= n:
                raise SiteError(f"layers {part} in {selector!r} out of range: {where} has {n} layers (0-{n - 1})")
            out.extend(range(lo, hi + 1))
        return sorted(set(out))

    def _linear(self, tower: Tower, layer: int, path: str, what: str) -> nn.Module:
        module = tower.layers[layer].get_submodule(path)
        _require_linear(module, f"{tower.site('layers')}.{layer}.{path}", what)
        return module

    def _layer_points(self, tower: Tower, i: int, site: str, kind: str, what: str) -> list[Point]:
        a = tower.arch
        base, _, part = site.partition(".")
        attention = a.cross if base == "cross_attn" else a
        depth = tower.offset + i
        if base == "ffn" and part.startswith("experts"):
            if kind != PROJECTION:
                raise BindError(f"{what} cannot bind to {site!r}: a mixture of experts' weights take LoRA or DoRA; "
                                f"{what} binds to {_KIND_SITES[kind]}")
            return self._experts(tower, i, part, what)
        if kind == PROJECTION:
            if part:
                names = [part]
            else:
                names = ["up", "down"] if base == "ffn" else ["qkv"] if attention.qkv else ["q", "k", "v"]
            return [self._projection(tower, i, base, name, what) for name in names]
        if kind == SUBLAYER and not part:
            inp, out = (a.up, a.down) if base == "ffn" else (attention.q, attention.o)
            if inp is None or out is None:
                self._no_ffn(tower, what)
            in_module, out_module = self._linear(tower, i, inp, what), self._linear(tower, i, out, what)
            position = {"attn": ATTENTION_SUBLAYER, "ffn": FFN_SUBLAYER, "cross_attn": CROSS_SUBLAYER}[base]
            return [Point(SUBLAYER, tower.key(i, site), tower.site(site), i, out_module, linear_dims(in_module)[0],
                          linear_dims(out_module)[1], in_module=in_module, position=position, depth=depth)]
        if kind == ATTENTION and base != "ffn" and not part:
            module = tower.layers[i].get_submodule(attention.attention)
            return [self._attention_point(tower.key(i, site), tower.site(site), i, module, depth)]
        raise BindError(f"{what} cannot bind to {site!r}; it binds to {_KIND_SITES[kind]}")

    def _no_ffn(self, tower: Tower, what: str) -> None:
        path = tower.arch.experts
        if path is not None:
            layer = next((b for b in tower.layers if _has(b, path)), tower.layers[0])
            module = layer.get_submodule(path)
            holder = path.rpartition(".")[0]
            beside = [f"{holder}.{n}" if holder else n for n, m in
                      (layer.get_submodule(holder) if holder else layer).named_modules()
                      if is_linear(m) and not _within(n, path.rpartition(".")[2])]
            shared = (f"; its other Linears ({', '.join(beside[:4])}, in every layer) are reached by path, e.g. "
                      f"'{tower.arch.layers}.*.{beside[0]}'" if beside else "")
            why = experts_layout(module)
            use = ("bind LoRA to 'ffn.experts' (each expert's gate_up_proj and down_proj) or to "
                   "'ffn.experts.gate_up' / 'ffn.experts.down'" if why is None else why)
            raise BindError(f"{what}: this model's feed-forward is a mixture of experts ({type(module).__name__} at "
                            f"{tower.site('layers')}.N.{path}) with no Linear up/down projections; {use}{shared}")
        experts = [type(m).__name__ for m in tower.layers[0].modules() if "expert" in type(m).__name__.lower()]
        kind = f" (a mixture of experts: {experts[0]})" if experts else ""
        raise BindError(f"{what}: this model's feed-forward has no Linear up/down projections{kind}; "
                        f"bind to attention sites, or name modules by path")

    def _experts(self, tower: Tower, i: int, part: str, what: str) -> list[Point]:
        """The EXPERTS points of layer i: 'experts' -> gate_up and down; 'experts.gate_up' / 'experts.down' -> one."""
        path = tower.arch.experts
        site = f"ffn.{part}"
        if path is None:
            raise BindError(f"{what} cannot bind to {site!r}: this model's feed-forward is not a mixture of experts "
                            f"(no module with 3-D gate_up_proj and down_proj weights); its sites: ffn, ffn.up, "
                            f"ffn.down" + (", ffn.gate" if tower.arch.gate else ""))
        where = f"{tower.site('layers')}.{i}.{path}"
        if not _has(tower.layers[i], path):
            sparse = [j for j, b in enumerate(tower.layers) if _has(b, path)]
            raise BindError(f"{what} cannot bind to {site!r} in layer {i}: that layer's feed-forward is dense (no "
                            f"{path}); its mixture-of-experts layers are {', '.join(map(str, sparse))}: select them, "
                            f"e.g. 'layers.{sparse[0]}.{site}'")
        module = tower.layers[i].get_submodule(path)
        why = experts_layout(module)
        if why is not None:
            raise BindError(f"{what} cannot bind to {site!r} ({where}): {why}")
        n, two_i, h = module.gate_up_proj.shape
        dims = {"gate_up": (h, two_i), "down": (two_i // 2, h)}
        names = list(EXPERT_PARTS) if part == "experts" else [part.partition(".")[2]]
        return [Point(EXPERTS, tower.key(i, f"ffn.experts.{name}"), tower.site(f"ffn.experts.{name}"), i, module,
                      *dims[name], depth=tower.offset + i, part=name, experts=n) for name in names]

    def _projection(self, tower: Tower, i: int, base: str, name: str, what: str = "a component") -> Point:
        a = tower.arch
        attention = a.cross if base == "cross_attn" else a
        where = tower.site("layers")
        if attention.qkv and name in ("q", "k", "v"):
            raise BindError(f"{what}: q, k and v are one fused projection in this model "
                            f"({where}.{i}.{attention.qkv}); bind to {base!r} to adapt it whole")
        paths = {"q": attention.q, "k": attention.k, "v": attention.v, "qkv": attention.qkv, "o": attention.o}
        if base == "ffn":
            paths = {"up": a.up, "down": a.down, "gate": a.gate}
        path = paths[name]
        if path is None:
            if name == "gate" and a.experts is None:
                raise BindError(f"{what}: this model's feed-forward has no gate projection; "
                                f"its sites: ffn.up, ffn.down")
            self._no_ffn(tower, what)
        module = self._linear(tower, i, path, what)
        inp, out = linear_dims(module)
        rows = None
        if a.fused_qkv and base == "attn" and name in ("q", "k", "v"):
            part = out // 3
            j = "qkv".index(name)
            rows, out = (j * part, (j + 1) * part), part
        site = f"{base}.{name}"
        return Point(PROJECTION, tower.key(i, site), tower.site(site), i, module, inp, out, rows=rows,
                     depth=tower.offset + i)

    def _attention_point(self, key: str, site: str, layer: int | None, module: nn.Module,
                         depth: int | None = None) -> Point:
        """Heads from the attention module where it says (BART's decoder may differ from its encoder), else
        from the model's config: n_kv_heads of head_dim (grouped-query models have fewer kv heads)."""
        cfg = getattr(module, "config", None) or getattr(self.model, "config", None)
        if cfg is None or not hasattr(cfg, "num_attention_heads"):
            raise BindError(f"prefix tuning at {site}: no config with num_attention_heads to size its keys and values")
        own = getattr(module, "num_heads", None)
        heads = own if isinstance(own, int) else cfg.num_attention_heads
        head_dim = next((d for d in (getattr(module, "head_dim", None), getattr(module, "key_value_proj_dim", None),
                                     getattr(cfg, "head_dim", None)) if isinstance(d, int)), cfg.hidden_size // heads)
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        d = kv_heads * head_dim
        return Point(ATTENTION, key, site, layer, module, d, d, n_kv_heads=kv_heads, head_dim=head_dim, depth=depth)

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

    def _raw(self, path: str, kind: str, what: str) -> Point:
        module = self.modules[path]
        key = "module:" + path.replace(".", ":")
        if kind == ATTENTION:
            return self._attention_point(key, path, None, module)
        if kind == EMBED or (kind == PROJECTION and isinstance(module, nn.Embedding)):
            return self._embedding(module, key, path, kind, what)
        if kind not in (PROJECTION, SUBLAYER):
            raise BindError(f"{what} cannot bind to module path {path!r}; it binds to {_KIND_SITES[kind]}")
        _require_linear(module, path, what)
        inp, out = linear_dims(module)
        if kind == PROJECTION:
            return Point(PROJECTION, key, path, None, module, inp, out)
        return Point(SUBLAYER, key, path, None, module, inp, out, in_module=module, position=RAW_SUBLAYER)

    def _embedding(self, module: nn.Module, key: str, site: str, kind: str, what: str) -> Point:
        """An embedding table: prompt tuning prepends rows of its output (EMBED); a low-rank update of its
        (num_embeddings, dim) table is a PROJECTION point with dim_in the number of rows."""
        if not isinstance(module, nn.Embedding):
            raise BindError(f"{what} cannot bind to {site!r}: it is a {type(module).__name__}, not an "
                            f"nn.Embedding (prompt tuning prepends rows of the input embedding)")
        if kind == PROJECTION:
            twins = [n for n, m in self.modules.items() if m is not module and isinstance(m, nn.Embedding)
                     and m.weight is module.weight]
            if twins and key == "embed":  # T5, BART: `shared`, while each tower looks up its own module holding the same table
                raise BindError(f"{what} cannot bind to {site!r}: its table is shared with {', '.join(twins)}, "
                                f"which look tokens up instead; name the one to adapt by path, e.g. {twins[0]!r}")
            return Point(PROJECTION, key, site, None, module, module.num_embeddings, module.embedding_dim)
        d = module.embedding_dim
        return Point(EMBED, key, site, None, module, d, d, model=self.model)

    def table(self) -> list[tuple[str, str, int, int]]:
        """(site, module paths, layers, parameters per layer) for every site this model has (`adaptune inspect`)."""
        if not any(s.layers for s in self.towers):
            return []
        names = {id(m): n for n, m in self.modules.items()}
        embed = self.model.get_input_embeddings()
        rows = [("embed", names.get(id(embed), "?"), 0, embed.weight.numel())] if embed is not None else []
        for tower in self.towers:
            for site in SITES[1:]:
                if site.startswith("cross_attn") and tower.arch.cross is None:
                    continue
                try:
                    per_layer = [self._layer_points(tower, i, site, PROJECTION, "a component")
                                 for i in range(len(tower.layers))]
                except BindError:
                    continue  # a site this model does not have (a gate, q alone in a fused projection)
                modules = {id(p.module): p.module for points in per_layer for p in points}
                paths = [names[id(m)] for m in modules.values()]
                shown = paths[0] if len(paths) == 1 else f"{paths[0]} … {paths[-1]}"
                count = sum(p.dim_out * p.dim_in * p.experts if p.kind == EXPERTS else
                            p.dim_out * (p.dim_in + (p.module.bias is not None)) for p in per_layer[0])
                rows.append((tower.site(site), shown, len(tower.layers), count))
        return rows
