"""Named sites of transformer architectures, selectors, and their resolution to concrete points.

A selector is `[layers.<spec>.]<site>` with site one of SITES and spec `3`, `0-7`, `0,2,5` or `*`,
or a raw module path of the model (`encoder.layer.0.attention.self.query`).
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Any, Callable

from torch import Tensor, nn

from .errors import BindError, SiteError

try:  # GPT-2's fused projections are transformers' Conv1D: weight stored (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency, but raw paths work without it
    Conv1D = type("Conv1D", (nn.Module,), {})

# roles: where a component acts
PROJECTION = "projection"  # a linear map (LoRA, DoRA): q, k, v, o, up, down or a raw Linear/Conv1D
SUBLAYER = "sublayer"  # the output of an attention or feed-forward sublayer (adapters)
ATTENTION = "attention"  # the keys and values of self-attention (prefix tuning)
EMBED = "embed"  # the input embeddings (prompt tuning)

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


# ---- points: the concrete places a component binds to ------------------------------------------

@dataclass
class Projection:
    key: str
    layer: int | None
    site: str
    module: nn.Module  # nn.Linear or Conv1D
    rows: slice | None  # output rows of a fused projection, None for all
    in_features: int
    out_features: int


@dataclass
class Sublayer:
    key: str
    layer: int | None
    site: str
    position: int  # 0 attention, 1 feed-forward, 2 raw module
    in_module: nn.Module  # its input is the sublayer input (parallel adapters)
    out_module: nn.Module  # its output is the sublayer output, before residual and norm
    dim_in: int
    dim_out: int


@dataclass
class AttentionPoint:
    key: str
    layer: int
    site: str
    module: nn.Module  # calls transformers' attention interface
    n_kv_heads: int
    head_dim: int


@dataclass
class EmbedPoint:
    key: str
    layer: None
    site: str
    module: nn.Embedding
    model: nn.Module


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def linear_weight(module: nn.Module) -> Tensor:
    """The weight as an (out, in) matrix (a transposed view for Conv1D)."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def linear_dims(module: nn.Module) -> tuple[int, int]:
    out, inp = linear_weight(module).shape
    return inp, out


_SELECTOR = re.compile(r"^(?:layers\.(?P<spec>[^.]+)\.)?(?P<site>[a-z]+(?:\.[a-z]+)?)$")
_ROLE_SITES = {
    PROJECTION: "attn (q, k, v), attn.q|k|v|o, ffn (up, down), ffn.up|down, or a Linear/Conv1D module path",
    SUBLAYER: "attn, ffn, or a Linear/Conv1D module path",
    ATTENTION: "attn",
    EMBED: "embed",
}


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
                f"or a module path such as {self._example_path()!r}")

    def _example_path(self) -> str:
        linears = [n for n, m in self.modules.items() if is_linear(m)]
        return linears[0] if linears else "encoder.layer.0.attention.self.query"

    def resolve(self, selector: str, role: str, what: str) -> list[Any]:
        """Points for `selector` in `role`; `what` names the component in errors."""
        if not isinstance(selector, str) or not selector:
            raise SiteError(f"a selector must be a non-empty string, got {selector!r}; {self.describe()}")
        if selector in self.modules and selector not in SITES:
            return [self._raw(selector, role, what)]
        match = _SELECTOR.match(selector)
        if not match or match["site"] not in SITES:
            raise SiteError(f"unknown site {selector!r}; {self.describe()}")
        site, spec = match["site"], match["spec"]
        if self.arch is None:
            raise SiteError(f"model type {self.model_type!r} has no site map (known: {', '.join(sorted(ARCHS))}); "
                            f"name modules by path instead, e.g. {self._example_path()!r}")
        if site == "embed":
            if spec is not None:
                raise SiteError(f"'embed' has no layers; write 'embed', not {selector!r}")
            if role != EMBED:
                raise BindError(f"{what} cannot bind to 'embed'; it binds to {_ROLE_SITES[role]}")
            return [EmbedPoint("embed", None, "embed", self.model.get_input_embeddings(), self.model)]
        return [p for i in self._layer_indices(spec, selector) for p in self._layer_points(i, site, role, what)]

    def _layer_indices(self, spec: str | None, selector: str) -> list[int]:
        n = self.n_layers
        if spec is None or spec == "*":
            return list(range(n))
        out: list[int] = []
        for part in spec.split(","):
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if not m:
                raise SiteError(f"bad layer spec {spec!r} in {selector!r}; write N, A-B, A,B or *")
            lo, hi = int(m[1]), int(m[2] if m[2] is not None else m[1])
            if lo > hi or hi >= n:
                raise SiteError(f"layers {part} in {selector!r} out of range: this model has {n} layers (0-{n - 1})")
            out.extend(range(lo, hi + 1))
        return sorted(set(out))

    def _get(self, layer: int, path: str) -> nn.Module:
        module = self.layers[layer]
        for part in path.split("."):
            module = getattr(module, part)
        return module

    def _layer_points(self, i: int, site: str, role: str, what: str) -> list[Any]:
        a = self.arch
        if role == PROJECTION:
            names = {"attn": ["q", "k", "v"], "ffn": ["up", "down"]}.get(site) or [site.split(".")[1]]
            return [self._projection(i, name) for name in names]
        if role == SUBLAYER and site in ("attn", "ffn"):
            inp, out = (a.q, a.o) if site == "attn" else (a.up, a.down)
            in_module, out_module = self._get(i, inp), self._get(i, out)
            return [Sublayer(f"layers:{i}:{site}", i, site, 0 if site == "attn" else 1, in_module, out_module,
                             linear_dims(in_module)[0], linear_dims(out_module)[1])]
        if role == ATTENTION and site == "attn":
            cfg = self.model.config
            heads = cfg.num_attention_heads
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
            kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
            return [AttentionPoint(f"layers:{i}:attn", i, "attn", self._get(i, a.attention), kv_heads, head_dim)]
        raise BindError(f"{what} cannot bind to {site!r}; it binds to {_ROLE_SITES[role]}")

    def _projection(self, i: int, name: str) -> Projection:
        a = self.arch
        path = {"q": a.q, "k": a.k, "v": a.v, "o": a.o, "up": a.up, "down": a.down}[name]
        module = self._get(i, path)
        inp, out = linear_dims(module)
        rows = None
        if a.fused_qkv and name in ("q", "k", "v"):
            part = out // 3
            j = "qkv".index(name)
            rows, out = slice(j * part, (j + 1) * part), part
        site = f"{'attn' if name in 'qkvo' else 'ffn'}.{name}"
        return Projection(f"layers:{i}:{site.replace('.', ':')}", i, site, module, rows, inp, out)

    def _raw(self, path: str, role: str, what: str) -> Any:
        module = self.modules[path]
        key = "module:" + path.replace(".", ":")
        if role not in (PROJECTION, SUBLAYER):
            raise BindError(f"{what} cannot bind to module path {path!r}; it binds to {_ROLE_SITES[role]}")
        if not is_linear(module):
            raise BindError(f"{what} cannot bind to {path!r}: it is a {type(module).__name__}, "
                            f"not a Linear or Conv1D layer")
        inp, out = linear_dims(module)
        if role == PROJECTION:
            return Projection(key, None, path, module, None, inp, out)
        return Sublayer(key, None, path, 2, module, module, inp, out)

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
            counts[p.site] = p.out_features * (p.in_features + (p.module.bias is not None))
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


# ---- attention implementations that prefix tuning can wrap (hooks/attention.py) -----------------

ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")  # None (a bare config) runs eager
ATTENTION_WRAPPER = "adaptune_"  # the prefix hook registers its wrapper of "sdpa" as "adaptune_sdpa"


def attention_implementation(module: nn.Module) -> str | None:
    """The attention implementation a transformers module's config names (None: none set)."""
    return getattr(getattr(module, "config", None), "_attn_implementation", None)


def base_implementation(name: str | None) -> str:
    """The implementation under a name, the wrapper's prefix removed ("adaptune_sdpa" -> "sdpa")."""
    name = name or "eager"
    return name[len(ATTENTION_WRAPPER):] if name.startswith(ATTENTION_WRAPPER) else name


def eager_attention(module: nn.Module) -> Callable | None:
    """The eager_attention_forward of the module's own modeling file, if it defines one."""
    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)


def check_attention_point(point: Any, what: str) -> None:
    """Raise BindError unless the attention module at `point` runs an implementation we can wrap."""
    module = point.module
    if getattr(module, "config", None) is None:
        raise BindError(f"{what} at {point.site} (layer {point.layer}): {type(module).__name__} has no `config`; "
                        f"prefix tuning needs a transformers attention module that calls the attention interface")
    name = attention_implementation(module)
    base = base_implementation(name)
    if base not in ATTENTION_IMPLEMENTATIONS:
        raise BindError(f"{what}: attention implementation {name!r} is not supported; prefix tuning supports "
                        f"{', '.join(map(repr, ATTENTION_IMPLEMENTATIONS))} "
                        f"(switch with model.set_attn_implementation('sdpa'))")
    if base == "eager" and eager_attention(module) is None:
        raise BindError(f"{what}: {type(module).__module__} defines no eager_attention_forward to wrap; "
                        f"use model.set_attn_implementation('sdpa')")
