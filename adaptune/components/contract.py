"""What a hook may call on a bound component module: one Protocol per kind of point, and the per-forward context.

A component's `bind(point, shared)` returns an nn.Module that acts at that point (`Component.kind`, one of
the point kinds of points.py). The hook of the point (hooks/) calls it through the Protocol of that kind and
nothing else; it never reads the module's other attributes, and the module never reads the adaptation: what
a forward needs to know (the running task, a route, a latent) arrives as a `Context`.

| kind       | Protocol             | modules                         | the hook                                 |
|------------|----------------------|---------------------------------|------------------------------------------|
| projection | LowRankUpdate        | LoRAModule, DoRAModule          | hooks/projection.py, lookup.py (tables)  |
| projection | BiasShift            | BiasShiftModule (BitFit)        | hooks/projection.py                      |
| sublayer   | SublayerModule       | AdapterModule, HyperAdapterModule | hooks/sublayer.py                      |
| attention  | AttentionModule      | PrefixModule, LatentKV, BidirectionalModule | hooks/attention.py           |
| embed      | PromptSource         | PromptModule                    | hooks/embed.py                           |
| module     | (the module's own call) | ModuleCopy (Trainable)       | hooks/module.py                          |
| experts    | ExpertsUpdate        | ExpertsLoRAModule, ExpertsDoRAModule | hooks/experts.py                  |

Class attributes (`bias_only`, `rescales_rows`, `parallel`, `routed`, `bidirectional`) are declared by every
module of the kind, so a hook reads them directly: no probing with hasattr.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor, nn

from ..points import Point
from ..sites import SiteMap


class Rows(Protocol):
    """A route as components see it: which rows of a batch of n run each task."""
    names: tuple[str, ...]

    def rows_for(self, n: int, device: torch.device, where: str) -> dict[int, Tensor]:
        """{task index (into `names`; -1 shared only): (k,) long row indices} for a batch of n rows."""


@dataclass(frozen=True)
class SharedContext:
    """What `Component.shared(ctx)` may read when it builds a module shared by all its points: the group
    (None: shared, else a task), the points, the adaptation's tasks, the model's sites, and the modules the
    group already shares (to reuse one: return it)."""
    group: str | None
    points: list[Point]
    tasks: list[str]
    sites: SiteMap
    common: list[nn.Module]


@dataclass(frozen=True)
class Context:
    """What one forward runs: `task` the running task (use(), or a route's single task; None: shared
    components only, or a mixed route), `route` inside a mixed route() (else None), `latent` inside
    condition() (N, d_z) (else None)."""
    task: str | None = None
    route: Rows | None = None
    latent: Tensor | None = None


class LowRankUpdate(Protocol):
    """A low-rank update of a projection's weight rows W (out, in): LoRA, or DoRA (`rescales_rows`)."""
    bias_only: ClassVar[bool]  # False
    rescales_rows: ClassVar[bool]  # DoRA: the rows of W + s·B·A rescaled to a learned magnitude
    scale: float

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The adapted projection of x (..., in): (..., out)."""

    def lookup(self, ids: Tensor, table: nn.Embedding) -> Tensor:
        """On an embedding table: what the update adds to the rows `table` looks up for `ids`."""

    def merged_weight(self, weight: Tensor) -> Tensor:
        """The weight with the update folded in (float32 at least): what merge() writes."""

    @staticmethod
    def routed_linear(modules: Sequence["LowRankUpdate"], x: Tensor, weight: Tensor, bias: Tensor | None,
                      index: Tensor) -> Tensor:
        """Each sample n of x through modules[index[n]] (-1: the base alone), batched."""


@runtime_checkable
class ExpertsUpdate(Protocol):
    """A low-rank update of every expert's fused weight W_e (E, out, in): LoRA or DoRA on a mixture of experts,
    expert e computing r_e ⊙ (x·W_eᵀ + s·(drop(x)·A_eᵀ)·B_eᵀ) on its rows (ops.grouped_lora)."""
    rescales_rows: ClassVar[bool]  # DoRA: r_e = m_e / n_e; LoRA: r_e = 1
    scale: float
    dropout: float
    A: Tensor  # (E, r, in), or (r, in) for every expert
    B: Tensor  # (E, out, r), or (out, r)

    def row_scale(self, weight: Tensor) -> Tensor | None:
        """r (E, out) for the current weight (E, out, in), or None (LoRA)."""

    def merged_weight(self, weight: Tensor) -> Tensor:
        """The weight (E, out, in) with every expert's update folded in (float32 at least): what merge() writes."""


class BiasShift(Protocol):
    """A shift δ (out,) added to a projection's output rows (BitFit)."""
    bias_only: ClassVar[bool]  # True
    delta: Tensor

    def merged_bias(self, bias: Tensor) -> Tensor:
        """b + δ (float32 at least): what merge() writes."""


class SublayerModule(Protocol):
    """A module on a sublayer's output h (..., d), before residual and norm: A(h) or, parallel, h + f(x)."""
    parallel: ClassVar[bool] | bool  # reads the sublayer's input x too
    routed: ClassVar[Callable[..., Tensor] | None]  # (modules, h, x, index) -> h, a task per sample; None: per task

    def __call__(self, h: Tensor, x: Tensor | None, context: Context) -> Tensor:
        """h adapted: (..., d)."""


class AttentionModule(Protocol):
    """A module on an attention layer: extra keys and values in front of its own, and/or no causal mask."""
    bidirectional: ClassVar[bool]  # drops the causal mask (the padding mask stays)

    def kv(self, context: Context) -> tuple[Tensor, Tensor] | None:
        """Extra (keys, values), each (n, H_kv·D) for every sample or (B, n, H_kv·D) per sample; None: none."""


class PromptSource(Protocol):
    """Soft tokens in front of the input embeddings."""

    def __call__(self) -> Tensor:
        """The prompt (n, d_model)."""
