"""Points: the concrete places of a model a component binds to, the roles they serve, and the
linear-weight helpers and attention checks that components and hooks share.

A point's `kind` is the role of the components that bind there:
    PROJECTION  a linear map y = x Wᵀ + b (LoRA, DoRA): `module` is the Linear / Conv1D, `rows` the
                (start, stop) output rows of a fused projection (GPT-2's c_attn: q, k, v are thirds),
                None for all;
                or an nn.Embedding table (LoRA only), the linear map of one-hot ids with W = tableᵀ
    SUBLAYER    the output h of an attention or feed-forward sublayer, before residual and norm
                (adapters): `module` produces h, `in_module` receives the sublayer input x
    ATTENTION   the keys, values and mask of an attention module (Prefix, PSA, AtM, Bidirectional):
                `module` calls transformers' attention interface with `n_kv_heads` heads of `head_dim`
    EMBED       the input embeddings (prompt tuning): `module` is the embedding, `model` runs it
    EXPERTS     one fused weight of a mixture of experts (LoRA per expert): `module` holds gate_up_proj
                (E, 2I, H) and down_proj (E, H, I), `part` names which ("gate_up" or "down"), `experts` is E;
                dim_in / dim_out are one expert's (H, 2I for gate_up; I, H for down)
"""
from __future__ import annotations

import functools
import inspect
import sys
from dataclasses import dataclass
from typing import Callable

from torch import Tensor, nn

from .errors import BindError
from .quantized import QuantizedWeight, scheme

try:  # GPT-2's fused projections are transformers' Conv1D: weight stored (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency, but raw paths work without it
    Conv1D = type("Conv1D", (nn.Module,), {})

PROJECTION = "projection"
SUBLAYER = "sublayer"
ATTENTION = "attention"
EMBED = "embed"
MODULE = "module"  # a whole module, by its path: `module` is it (a trained copy replaces it)
EXPERTS = "experts"
KINDS = (PROJECTION, SUBLAYER, ATTENTION, EMBED, MODULE, EXPERTS)
EXPERT_PARTS = ("gate_up", "down")  # the fused expert weights: `<part>_proj` of the experts module

# a sublayer's position (hypernetwork adapters embed it)
ATTENTION_SUBLAYER, FFN_SUBLAYER, RAW_SUBLAYER, CROSS_SUBLAYER = 0, 1, 2, 3


@dataclass(frozen=True, eq=False)
class Point:
    """One place of one model; `key` names it uniquely ("layers:3:attn:q", "module:encoder:...", "embed")."""
    kind: str
    key: str
    site: str  # the site (attn.q, ffn, ...) or module path it was resolved from
    layer: int | None  # None: the embeddings or a raw module path; else the index in its layer tower
    module: nn.Module
    dim_in: int  # width of what enters the place (in features; the sublayer input; H_kv·D; d_model)
    dim_out: int  # width of what it produces (out features of `rows`; the sublayer output; H_kv·D; d_model)
    rows: tuple[int, int] | None = None  # PROJECTION: (start, stop) output rows of a fused projection; not a
    # slice: torch.compile hashes frozen dataclasses (a Binding, its Point) by their fields; slices are unhashable
    # before Python 3.12
    in_module: nn.Module | None = None  # SUBLAYER: receives the sublayer input
    position: int | None = None  # SUBLAYER: ATTENTION_SUBLAYER, FFN_SUBLAYER, CROSS_SUBLAYER or RAW_SUBLAYER
    n_kv_heads: int | None = None  # ATTENTION
    head_dim: int | None = None  # ATTENTION
    model: nn.Module | None = None  # EMBED
    depth: int | None = None  # the layer's index among all layers of the model (encoder first); None with layer
    part: str | None = None  # EXPERTS: "gate_up" or "down"
    experts: int | None = None  # EXPERTS: the number of experts E

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"point kind {self.kind!r}; kinds: {', '.join(KINDS)}")

    @property
    def out_rows(self) -> slice:
        """The output rows the point covers, as a slice: `rows`, or all of them."""
        return slice(*self.rows) if self.rows is not None else slice(0, self.dim_out)

    @property
    def place(self) -> tuple:
        """What one hook routes: points with the same place share it."""
        return self.kind, id(self.module), id(self.in_module)

    def where(self) -> str:
        return f"{self.site} (layer {self.layer})"


# ---- linear layers ------------------------------------------------------------------------------

def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def is_table(module: nn.Module) -> bool:
    """An embedding table: a projection point on it maps one-hot ids (in = num_embeddings) to rows (out = dim)."""
    return isinstance(module, nn.Embedding)


def linear_weight(module: nn.Module) -> Tensor | QuantizedWeight:
    """The weight as an (out, in) matrix (a transposed view for Conv1D and for an embedding table; a
    QuantizedWeight for a supported quantized layer)."""
    if isinstance(module, (Conv1D, nn.Embedding)):
        return module.weight.t()
    return QuantizedWeight(module) if scheme(module) else module.weight


def tied_to(model: nn.Module, module: nn.Module, param: Tensor) -> list[str]:
    """The paths of the other modules of `model` that hold `param` (a weight tied to another module's)."""
    return [n for n, m in model.named_modules()
            if m is not module and any(p is param for p in m.parameters(recurse=False))]


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in features, out features): the weight's shape, or what a quantized Linear declares (its weight
    is packed storage: bitsandbytes' 4-bit weight is (in·out/2, 1))."""
    declared = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if quantization(module) and all(isinstance(d, int) and not isinstance(d, bool) for d in declared):
        return declared  # type: ignore[return-value]
    out, inp = linear_weight(module).shape
    return inp, out


def expert_weight(point: Point) -> Tensor:
    """The fused 3-D weight of an EXPERTS point: (E, 2I, H) gate_up_proj or (E, H, I) down_proj."""
    return getattr(point.module, f"{point.part}_proj")


# ---- quantized layers: the supported ones by what they are (quantized.py), any other by names, dtypes and shapes ----

QUANTIZERS = ("bitsandbytes", "torchao", "auto_gptq", "gptqmodel", "awq", "hqq", "optimum.quanto",
              "torch.ao.nn.quantized", "torch.nn.quantized")  # the packages of quantized layers and tensors
QUANTIZED_NAMES = ("Linear4bit", "Linear8bitLt", "LinearNF4", "LinearFP4", "Params4bit", "Int8Params")
READS_WEIGHT = (PROJECTION, MODULE, EMBED, EXPERTS)  # kinds whose components read or train the base weight


def _quantized_class(cls: type) -> str | None:
    """'module.Class' of the first class in `cls`'s MRO that comes from a quantization package or bears a
    quantized layer's name; None if none does."""
    for c in cls.__mro__:
        where = c.__module__ or ""
        if c.__name__ in QUANTIZED_NAMES or any(where == q or where.startswith(q + ".") for q in QUANTIZERS):
            return f"{where}.{c.__qualname__}"
    return None


def quantization(module: nn.Module) -> str | None:
    """What makes `module` a quantized layer, in words: its class, its weight's tensor class, a weight of one-byte
    elements (int8 / uint8 storage, float8), or one not of the shape the Linear declares (packed); None for a
    floating-point layer."""
    found = _quantized_class(type(module))
    if found:
        return found
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor):
        return None
    found = _quantized_class(type(weight)) if type(weight) not in (Tensor, nn.Parameter) else None
    if found:
        return f"{type(module).__name__} with a {found} weight ({weight.dtype})"
    if not (weight.is_floating_point() or weight.is_complex()) or weight.element_size() == 1:  # int8, uint8, fp8
        return f"{type(module).__name__} with a {weight.dtype} weight of shape {tuple(weight.shape)}"
    if isinstance(module, nn.Linear) and tuple(weight.shape) != (module.out_features, module.in_features):
        return (f"{type(module).__name__} with a packed weight: shape {tuple(weight.shape)}, not "
                f"(out_features, in_features) = ({module.out_features}, {module.in_features})")
    return None


def check_quantized(point: Point, what: str) -> None:
    """BindError when a component that reads or trains the base weight at `point` meets a quantized layer it
    cannot use. LoRA, DoRA and BitFit (projections) take the supported ones (adaptune.quantized); Trainable
    and PromptTuning need float weights; any other quantization is refused, naming what is supported. A layer
    whose weights DeepSpeed ZeRO-3 has already partitioned (zero.Init) is refused too: what this rank holds is
    a slice (often empty), not the weight."""
    for name, param in point.module.named_parameters():
        if hasattr(param, "ds_id"):  # a DeepSpeed ZeRO-3 parameter: its data is this rank's partition
            raise BindError(f"{what} at {point.where()}: the layer's weights are partitioned by DeepSpeed ZeRO-3 "
                            f"({name or 'weight'!r} holds {tuple(param.shape)} of {tuple(getattr(param, 'ds_shape', ()))} "
                            f"here); attach before ZeRO-3 partitions the model: build (from_pretrained) and attach "
                            f"before creating TrainingArguments(deepspeed=...) with stage 3, deepspeed.initialize "
                            f"or zero.Init")
    if point.kind not in READS_WEIGHT:
        return
    for name, module in point.module.named_modules():
        found = quantization(module)
        if not found:
            continue
        inside = f" (its submodule {name!r})" if name else ""
        supported = scheme(module)
        if supported and point.kind == PROJECTION and not name:
            continue
        if supported:
            raise BindError(f"{what} at {point.where()}: the layer{inside} is quantized ({supported}); {what} "
                            f"trains or reads it as float weights. On a quantized base, adapt its projections "
                            f"with LoRA, DoRA or BitFit, and keep Trainable for modules left in float (the heads)")
        raise BindError(f"{what} at {point.where()}: the layer is quantized{inside}: {found}, which adaptune does "
                        f"not support. Supported: bitsandbytes Linear4bit (nf4, fp4) and Linear8bitLt, and torchao "
                        f"weight-only tensors; load the model with one of those or without quantization, "
                        f"or use components that do not read the weight (Adapter, Prefix, HyperAdapter, ...)")


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


def calls_attention_interface(module: nn.Module) -> bool:
    """Whether the module's forward dispatches through transformers' attention interface (its source
    names ALL_ATTENTION_FUNCTIONS); modules that branch on the implementation's name cannot be wrapped."""
    return _calls_interface(type(module))


@functools.cache
def _calls_interface(cls: type) -> bool:  # read once per class, not once per layer
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in source


def check_attention_point(point: Point, what: str) -> None:
    """Raise BindError unless the attention module at `point` runs an implementation we can wrap."""
    module = point.module
    if getattr(module, "config", None) is None:
        raise BindError(f"{what} at {point.where()}: {type(module).__name__} has no `config`; "
                        f"attention components need a transformers attention module that calls the attention interface")
    if not calls_attention_interface(module):
        raise BindError(f"{what} at {point.where()}: {type(module).__name__} does not call transformers' attention "
                        f"interface (ALL_ATTENTION_FUNCTIONS), so {what} cannot reach its keys, values and mask")
    name = attention_implementation(module)
    base = base_implementation(name)
    if base not in ATTENTION_IMPLEMENTATIONS:
        raise BindError(f"{what}: attention implementation {name!r} is not supported; attention components support "
                        f"{', '.join(map(repr, ATTENTION_IMPLEMENTATIONS))} "
                        f"(switch with model.set_attn_implementation('sdpa'))")
    if base == "eager" and eager_attention(module) is None:
        raise BindError(f"{what}: {type(module).__module__} defines no eager_attention_forward to wrap; "
                        f"use model.set_attn_implementation('sdpa')")
