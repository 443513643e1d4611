"""Latent injection: a per-sample latent z (B, d_z) as extra keys and values of attention (seed 001 §2.3).

    PSA (Pseudo Self-Attention, Fang et al.):  k_z = W_k·z,  v_z = W_v·z    separate maps, k_z ≠ v_z
    AtM (Add to Memory, Li et al. / Optimus):   k_z = v_z = W·z             one map for both

per layer, each (B, 1, H_kv·D), in front of the layer's keys and values: every query sees them (no
causal mask, no position). `PSA | AtM` injects both (two extra positions). The latent comes from
`with adaptation.condition(z): model(...)` (or `model.generate(...)`); a forward without one is an
error. Maps are bias-free Linear layers, PyTorch's default initialisation.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ..errors import AdaptuneError, ConfigError
from ..points import ATTENTION, Point, check_attention_point
from .base import Component, check_positive
from .contract import Context


@dataclass(frozen=True)
class PSA(Component):
    latent_dim: int = 32

    kind = ATTENTION
    separate = True  # k_z and v_z from separate maps

    def __post_init__(self) -> None:
        check_positive("latent_dim", self.latent_dim)

    def bind(self, point: Point, shared=None) -> "LatentKV":
        check_attention_point(point, repr(self))
        return LatentKV(self, point)


@dataclass(frozen=True)
class AtM(PSA):
    separate = False  # k_z = v_z


class LatentKV(nn.Module):
    """One attention layer's projections of the latent to its extra key and value: an AttentionModule
    (components/contract.py)."""
    bidirectional = False

    def __init__(self, component: PSA, point: Point) -> None:
        super().__init__()
        self.component, self.where = component, point.where()
        kv_dim = point.n_kv_heads * point.head_dim
        self.key = nn.Linear(component.latent_dim, kv_dim, bias=False)  # (H_kv·D, d_z)
        self.value = nn.Linear(component.latent_dim, kv_dim, bias=False) if component.separate else None

    def kv(self, context: Context) -> tuple[Tensor, Tensor]:
        """(k_z, v_z), each (B, 1, H_kv·D), from the forward's latent (B, d_z)."""
        z = context.latent
        name = type(self.component).__name__
        if z is None:
            raise AdaptuneError(f"{name} at {self.where} needs a latent: run the model inside "
                                f"`with adaptation.condition(z):` (z of shape (batch, {self.component.latent_dim}))")
        if z.shape[-1] != self.key.in_features:
            raise ConfigError(f"{name} at {self.where} takes latents of size {self.key.in_features}, got {z.shape[-1]}")
        z = z.to(self.key.weight.dtype)
        k = self.key(z).unsqueeze(1)  # (B, 1, H_kv·D)
        return k, (self.value(z).unsqueeze(1) if self.value is not None else k)

    def extra_repr(self) -> str:
        return f"{type(self.component).__name__}, latent_dim={self.key.in_features}, kv_dim={self.key.out_features}"
