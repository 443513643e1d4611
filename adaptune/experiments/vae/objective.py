"""The VAE objective: Gaussian KL, free bits (seed eq. 4), cyclical β annealing, reparameterized sampling.

    loss = rec_nll + β(step) · kl_term(mean, logvar, λ)

q(z|x) = N(mean, diag(exp(logvar))), p(z) = N(0, I). Every function takes the posterior as two (B, d) tensors.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ...errors import ConfigError


def check_posterior(mean: Tensor, logvar: Tensor, where: str) -> None:
    """Raise ConfigError unless mean and logvar are finite float tensors of one shape (B, d), B, d ≥ 1."""
    for name, t in (("mean", mean), ("logvar", logvar)):
        if not isinstance(t, Tensor) or not t.is_floating_point() or t.dim() != 2:
            got = f"shape {tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
            raise ConfigError(f"{where}: {name} must be a float tensor (batch, latent_dim), got {got}")
    if mean.shape != logvar.shape:
        raise ConfigError(f"{where}: mean {tuple(mean.shape)} and logvar {tuple(logvar.shape)} differ in shape")
    if mean.numel() == 0:
        raise ConfigError(f"{where}: the posterior is empty, shape {tuple(mean.shape)}; need batch, latent_dim ≥ 1")
    if not (torch.isfinite(mean).all() and torch.isfinite(logvar).all()):
        raise ConfigError(f"{where}: mean or logvar holds NaN or inf")


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def gaussian_kl(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) ‖ N(0, 1)) per dimension: ½(mean² + exp(logvar) − logvar − 1), shape (B, d)."""
    check_posterior(mean, logvar, "gaussian_kl")
    return 0.5 * (mean.pow(2) + logvar.exp() - logvar - 1.0)  # (B, d)


def kl_term(mean: Tensor, logvar: Tensor, free_bits: float, per_dim: bool = False) -> Tensor:
    """The KL term to multiply by β, a scalar, with free bits λ = `free_bits` (nats per latent dimension).

    With KL_bi = gaussian_kl(mean, logvar) (B, d) and KL_i = (1/B) Σ_b KL_bi (the batch mean per dimension):

        per_dim=False  max(λ·d, Σ_i KL_i)     seed eq. 4 on the whole KL, threshold λ·d (kl_rate = λ·d_z)
        per_dim=True   Σ_i max(λ, KL_i)        per-dimension free bits (Kingma et al. 2016), batch mean first

    (Optimus's fb_mode=1 is a third form, not offered here: it masks each sample's dimensions,
    (1/B) Σ_b Σ_i KL_bi·[KL_bi > λ], so a dimension below λ counts 0, not λ.)

    Where the threshold wins, the term is the constant threshold and gives no gradient; where the KL wins,
    the gradient is the KL's (torch.clamp: at exact equality the gradient passes)."""
    if not _number(free_bits) or free_bits < 0:
        raise ConfigError(f"kl_term: free_bits must be a finite number ≥ 0 (nats per latent dimension), "
                          f"got {free_bits!r}")
    kl = gaussian_kl(mean, logvar).mean(dim=0)  # (d,)
    if per_dim:
        return kl.clamp(min=free_bits).sum()
    return kl.sum().clamp(min=free_bits * kl.shape[0])


def cyclical_beta(step: int, total_steps: int, cycles: int = 4, zero: float = 0.25, rise: float = 0.25) -> float:
    """Cyclical annealing of β (Fu et al. 2019) over `total_steps` split into `cycles` equal cycles.

    With f = (step · cycles mod total_steps) / total_steps, the position within the current cycle in [0, 1):

        β = 0                      f < zero              (the first `zero` of each cycle)
        β = (f − zero) / rise      zero ≤ f < zero+rise  (linear 0 → 1)
        β = 1                      otherwise             (the rest of the cycle)

    The default is 25% at 0, 25% rising, 50% at 1, four cycles. Steps past the schedule (step ≥ total_steps)
    stay at β = 1, the last cycle's plateau."""
    if not _count(total_steps) or total_steps < 1:
        raise ConfigError(f"cyclical_beta: total_steps must be an integer ≥ 1, got {total_steps!r}")
    if not _count(cycles) or not 1 <= cycles <= total_steps:
        raise ConfigError(f"cyclical_beta: cycles must be an integer from 1 to total_steps ({total_steps}), "
                          f"got {cycles!r}")
    if not _number(zero) or zero < 0:
        raise ConfigError(f"cyclical_beta: zero must be a finite fraction of a cycle ≥ 0, got {zero!r}")
    if not _number(rise) or rise <= 0:
        raise ConfigError(f"cyclical_beta: rise must be a finite fraction of a cycle > 0, got {rise!r}")
    if zero + rise > 1:
        raise ConfigError(f"cyclical_beta: zero + rise must be at most 1 (one cycle), got {zero} + {rise}")
    if not _count(step) or step < 0:
        raise ConfigError(f"cyclical_beta: step must be an integer ≥ 0, got {step!r}")
    if step >= total_steps:
        return 1.0
    f = (step * cycles % total_steps) / total_steps  # exact position within the cycle, [0, 1)
    if f < zero:
        return 0.0
    return min(1.0, (f - zero) / rise)


def reparameterize(mean: Tensor, logvar: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """z = mean + exp(logvar / 2) · ε, ε ~ N(0, I) drawn from `generator` (on mean's device); any one shape.

    Differentiable in mean and logvar; with the same generator state the same z."""
    if not (isinstance(mean, Tensor) and isinstance(logvar, Tensor) and mean.is_floating_point()
            and mean.shape == logvar.shape):
        raise ConfigError("reparameterize: mean and logvar must be float tensors of one shape, got "
                          f"{getattr(mean, 'shape', type(mean).__name__)} and "
                          f"{getattr(logvar, 'shape', type(logvar).__name__)}")
    if not (torch.isfinite(mean).all() and torch.isfinite(logvar).all()):
        raise ConfigError("reparameterize: mean or logvar holds NaN or inf")
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + (0.5 * logvar).exp() * eps
