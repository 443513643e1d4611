"""LoRA (Hu et al.): y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ with s = alpha / r; B starts at zero.

Options as in Hugging Face PEFT:
- rslora=True (rank-stabilised LoRA, Kalajdzievski): s = alpha / √r.
- init="pissa" (Meng et al.): W = U·S·Vᵀ, A₀ = √(S_r/s)·V_rᵀ, B₀ = U_r·√(S_r/s), so s·B₀·A₀ is the top-r
  part of W. init="olora" (Büyükakyüz): W = Q·R, A₀ = R_r (first r rows), B₀ = Q_r (first r columns).
  Both start A = A₀, B = B₀ and train on the residual W − s·B₀·A₀. PEFT writes that residual into the
  base weight; adaptune never touches the base: the module keeps A₀, B₀ as frozen buffers and computes
  y = x·Wᵀ + b − s·(x·A₀ᵀ)·B₀ᵀ + s·(drop(x)·Aᵀ)·Bᵀ, the same function, so a fresh PiSSA / OLoRA is the
  identity and detach() leaves W bit-exact. Only the product B₀·A₀ matters (the truncated SVD, or
  the projection Q_r·Q_rᵀ·W), so it is unique whatever signs the decomposition picks.

On an embedding table E (num, dim) ('embed' or an nn.Embedding path), as PEFT's lora.Embedding:
y = E[ids] + s·Aᵀ[ids]·Bᵀ with A (r, num) zeros and B (dim, r) normal at first (the identity), the
lookup of Aᵀ taking the table's padding_idx / max_norm options, times its `embed_scale` if it has one.
Dropout (on ids) and PiSSA / OLoRA do not apply there; merging adds s·(B·A)ᵀ to E.

On a mixture of experts ('ffn.experts', 'ffn.experts.gate_up|down': fused (E, out, in) weights W_e), a factor
pair per expert: A (E, r, in), B (E, out, r), B = 0 at first, expert e computing x·W_eᵀ + s·(drop(x)·A_eᵀ)·B_eᵀ
on the tokens routed to it; experts="one" gives every expert one pair A (r, in), B (out, r). Merging adds
s·B_e·A_e to each W_e.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..errors import BindError, ConfigError
from ..points import EXPERTS, PROJECTION, Point, is_table, linear_weight
from ..quantized import QuantizedWeight
from .base import Component, check_choice, check_dropout, check_positive

INITS = ("default", "pissa", "olora")  # data-free initialisations; PEFT's init_lora_weights True, "pissa", "olora"
EXPERT_FACTORS = ("each", "one")  # on a mixture of experts: a factor pair per expert, or one for all of them


@dataclass(frozen=True, repr=False)
class LoRA(Component):
    r: int = 8
    alpha: float | None = None  # None: alpha = r (alpha = √r with rslora), so s = 1
    dropout: float = 0.0
    rslora: bool = False  # s = alpha / √r instead of alpha / r
    init: str = "default"  # "default" (A Kaiming-uniform, B = 0), "pissa" or "olora"
    experts: str = "each"  # on ffn.experts: "each" expert its own factors, or "one" pair for all experts

    kind = PROJECTION

    def __repr__(self) -> str:  # `experts` shown only when set: it matters on experts sites alone
        shown = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                 if f.name != "experts" or self.experts != "each"]
        return f"{type(self).__name__}({', '.join(shown)})"

    def to_dict(self) -> dict:
        data = super().to_dict()
        if data.get("experts") == "each":
            del data["experts"]  # as written before the option existed
        return data

    def __post_init__(self) -> None:
        check_positive("r", self.r)
        if self.alpha is not None:
            check_positive("alpha", self.alpha, (int, float))  # type: ignore[arg-type]
        check_dropout(self.dropout)
        if not isinstance(self.rslora, bool):
            raise ConfigError(f"rslora must be True or False, got {self.rslora!r}")
        check_choice("init", self.init, INITS)
        check_choice("experts", self.experts, EXPERT_FACTORS)

    @property
    def scale(self) -> float:
        if self.alpha is None:
            return 1.0
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def bind(self, point: Point, shared=None) -> "LoRAModule | ExpertsLoRAModule":
        if point.kind == EXPERTS:
            return ExpertsLoRAModule(self, point)
        return LoRAModule(self, point)


@torch.no_grad()
def initial_factors(weight: Tensor, r: int, scale: float, init: str) -> tuple[Tensor, Tensor]:
    """A₀ (r, in), B₀ (out, r) in float32 from W (out, in), as PEFT's pissa_init / olora_init make them."""
    w = weight.detach().float()
    if init == "pissa":
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)  # (out, k), (k,), (k, in)
        root = (S[:r] / scale).sqrt()  # (r,)
        return (root[:, None] * Vh[:r]).contiguous(), (U[:, :r] * root).contiguous()
    Q, R = torch.linalg.qr(w)  # olora: (out, k), (k, in)
    return R[:r].contiguous(), Q[:, :r].contiguous()


class LoRAModule(nn.Module):
    """The low-rank factors of one projection (or one slice of a fused projection): a LowRankUpdate
    (components/contract.py)."""
    bias_only = False
    rescales_rows = False  # DoRAModule: True
    detach_norm = True  # DoRAModule's option; a LoRA has no norm

    def __init__(self, component: LoRA, point: Point) -> None:
        super().__init__()
        r, d_in, d_out = component.r, point.dim_in, point.dim_out
        if r > min(d_in, d_out):
            raise BindError(f"{component!r} at {point.site} (layer {point.layer}): r={r} is larger than the layer "
                            f"({d_out}×{d_in}); r must be in 1..{min(d_in, d_out)}")
        self.scale, self.dropout = component.scale, component.dropout
        self.init, self.rslora = component.init, component.rslora
        if is_table(point.module):
            _check_table(component, point)
            self.A = nn.Parameter(torch.zeros(r, d_in))  # (r, num_embeddings)
            self.B = nn.Parameter(torch.randn(d_out, r))  # (dim, r)
            return
        if component.init == "default":
            self.A = nn.Parameter(torch.empty(r, d_in))  # (r, in)
            self.B = nn.Parameter(torch.zeros(d_out, r))  # (out, r)
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
            return
        weight = linear_weight(point.module)[point.out_rows]  # (out, in)
        if isinstance(weight, QuantizedWeight):
            weight = weight.dequantize()  # a transient float copy: the factors start from what the layer computes
        if not weight.is_floating_point():
            raise BindError(f"{component!r} at {point.where()}: init={component.init!r} needs a float weight")
        A0, B0 = initial_factors(weight, r, self.scale, component.init)
        self.A, self.B = nn.Parameter(A0.clone()), nn.Parameter(B0.clone())
        self.register_buffer("A0", A0)  # (r, in), frozen: the part of W the factors start from
        self.register_buffer("B0", B0)  # (out, r)

    @property
    def residual(self) -> bool:
        """Whether the module subtracts s·B₀·A₀ (PiSSA / OLoRA)."""
        return self.init != "default"

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        y = ops.lora(x, weight, bias, self.A, self.B, self.scale, self.dropout, self.training)
        if self.residual:
            y = y - self.scale * F.linear(F.linear(x, self.A0.to(x.dtype)), self.B0.to(x.dtype))
        return y

    def lookup(self, ids: Tensor, table: nn.Embedding) -> Tensor:
        """s·Aᵀ[ids]·Bᵀ (times the table's embed_scale): what the LoRA adds to the rows `table` looks up."""
        rows = F.embedding(ids, self.A.T, table.padding_idx, table.max_norm, table.norm_type,
                           table.scale_grad_by_freq, table.sparse)  # (..., r)
        y = (rows @ self.B.T) * self.scale
        scale = embed_scale(table)
        return y if scale is None else y * scale.to(y.dtype)

    def update(self) -> tuple[Tensor, Tensor]:
        """Factors (A′, B′) with s·B′·A′ the whole update to W: (A, B), or ([A; A₀], [B, −B₀]) of rank 2r."""
        if not self.residual:
            return self.A, self.B
        return torch.cat([self.A, self.A0.to(self.A.dtype)]), torch.cat([self.B, -self.B0.to(self.B.dtype)], dim=1)

    def merged_weight(self, weight: Tensor) -> Tensor:
        """W + s·B′·A′ (W a float tensor), in float32 at least; used only by merge()."""
        A, B = self.update()
        return weight.float() + self.scale * (B.float() @ A.float())

    @staticmethod
    def routed_linear(modules: list["LoRAModule"], x: Tensor, weight: Tensor, bias: Tensor | None,
                      index: Tensor) -> Tensor:
        """Each sample n through modules[index[n]] (-1: the base alone) in one routed op: LoRA and DoRA
        modules (`rescales_rows`) each in their own op when a batch mixes them."""
        dora = torch.tensor([m.rescales_rows for m in modules], device=index.device)
        if not dora.any():
            return _routed(modules, x, weight, bias, index, dora=False)
        if dora.all():
            return _routed(modules, x, weight, bias, index, dora=True)
        on = dora[index.clamp_min(0)] & (index >= 0)  # (N,) the samples whose task has a DoRA here
        y_lora = _routed(modules, x, weight, bias, index.masked_fill(on, -1), dora=False)
        y_dora = _routed(modules, x, weight, bias, index.masked_fill(~on, -1), dora=True)
        return torch.where(on.view(-1, *[1] * (x.dim() - 1)), y_dora, y_lora)


class ExpertsLoRAModule(nn.Module):
    """The low-rank factors of one fused expert weight (E, out, in): A (E, r, in) and B (E, out, r), or one pair
    A (r, in), B (out, r) for every expert (experts="one"). An ExpertsUpdate (components/contract.py)."""
    rescales_rows = False  # ExpertsDoRAModule: True

    def __init__(self, component: LoRA, point: Point) -> None:
        super().__init__()
        r, d_in, d_out, n = component.r, point.dim_in, point.dim_out, point.experts
        what = f"{component!r} at {point.where()}"
        if r > min(d_in, d_out):
            raise BindError(f"{what}: r={r} is larger than one expert's {point.part}_proj ({d_out}×{d_in}); r must "
                            f"be in 1..{min(d_in, d_out)}")
        if component.init != "default":
            raise BindError(f"{what}: init={component.init!r} is not supported on a mixture of experts' weights; "
                            f"use init='default' there")
        self.scale, self.dropout, self.rslora = component.scale, component.dropout, component.rslora
        self.each = component.experts == "each"
        lead = (n,) if self.each else ()
        self.A = nn.Parameter(torch.empty(*lead, r, d_in))  # (E, r, in) or (r, in)
        self.B = nn.Parameter(torch.zeros(*lead, d_out, r))  # (E, out, r) or (out, r)
        for a in (self.A if self.each else [self.A]):
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # per expert: fan-in `in`, as a LoRA's A

    def factors(self, expert: int) -> tuple[Tensor, Tensor]:
        """(A_e (r, in), B_e (out, r)) of expert `expert`."""
        return (self.A[expert], self.B[expert]) if self.each else (self.A, self.B)

    def row_scale(self, weight: Tensor) -> None:
        """LoRA rescales no rows (ExpertsDoRAModule: m / n)."""
        return None

    def merged_weight(self, weight: Tensor) -> Tensor:
        """W_e + s·B_e·A_e for every expert of weight (E, out, in), in float32 at least; used only by merge()."""
        return weight.float() + self.scale * (self.B.float() @ self.A.float())


def _routed(modules: list[LoRAModule], x: Tensor, weight: Tensor, bias: Tensor | None, index: Tensor,
            dora: bool) -> Tensor:
    """ops.lora_routed / ops.dora_routed over the modules' stacked factors (ranks zero-padded to the largest)."""
    factors = [m.update() for m in modules]
    r = max(A.shape[0] for A, _ in factors)
    A = torch.stack([F.pad(A, (0, 0, 0, r - A.shape[0])) for A, _ in factors])  # (T, r, in)
    B = torch.stack([F.pad(B, (0, r - B.shape[1])) for _, B in factors])  # (T, out, r)
    scale = torch.tensor([m.scale for m in modules], device=x.device)
    dropout, training = tuple(m.dropout for m in modules), modules[0].training
    if not dora:
        return ops.lora_routed(x, weight, bias, A, B, scale, index, dropout, training)
    ones = torch.ones(weight.shape[0], device=A.device, dtype=A.dtype)  # LoRA rows: m / n = 1 (never read)
    magnitude = torch.stack([m.magnitude if m.rescales_rows else ones for m in modules])  # (T, out)
    norm = _task_norms(modules, weight, A, B, scale)
    return ops.dora_routed(x, weight, bias, A, B, magnitude, norm, scale, index, dropout, training)


def _task_norms(modules: list[LoRAModule], weight: Tensor, A: Tensor, B: Tensor, scale: Tensor) -> Tensor:
    """Every task's DoRA row norms (T, out) in one stacked ops.dora_norm, which reads W once (the rows of
    LoRA tasks are computed and never read). A task's norm is detached unless its DoRA has detach_norm=False."""
    wsq = next(m for m in modules if m.rescales_rows)._weight_norm_sq(weight)
    keep = [not m.detach_norm for m in modules]
    grad = any(keep) and torch.is_grad_enabled()
    if grad:
        mask = torch.tensor(keep, device=A.device).view(-1, 1, 1)
        A, B = torch.where(mask, A, A.detach()), torch.where(mask, B, B.detach())
    with torch.set_grad_enabled(grad):
        return ops.dora_norm(weight, scale.to(A.dtype).view(-1, 1, 1) * A, B, 1.0, wsq)


def _check_table(component: LoRA, point: Point) -> None:
    what = f"{component!r} at {point.site!r}"
    if component.init != "default":
        raise BindError(f"{what}: init={component.init!r} does not apply to an embedding table (nor does PEFT apply "
                        f"it there); use init='default' on embeddings")
    if component.dropout:
        raise BindError(f"{what}: dropout does not apply to an embedding table (its input is token ids, as in "
                        f"PEFT); use dropout=0.0 on embeddings")


def embed_scale(table: nn.Module) -> Tensor | None:
    """The scalar a scaled embedding (Gemma's) multiplies its rows by, as PEFT reads it; None for none."""
    scale = getattr(table, "embed_scale", None)
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        return torch.tensor(scale, device=table.weight.device, dtype=table.weight.dtype)
    if isinstance(scale, Tensor) and scale.numel() == 1:
        return scale
    return None
