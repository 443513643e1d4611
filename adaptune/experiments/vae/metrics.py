"""VAE language-model metrics as Optimus computes them: importance-weighted log p(x), PPL, −ELBO, MI, AU.

    log p(x) ≈ logsumexp_k [log p(x|z_k) + log p(z_k) − log q(z_k|x)] − log K,  z_k ~ q(z|x)   (calc_iwnll)
    PPL      = exp(−Σ_x log p(x) / Σ_x tokens)
    −ELBO    = (Σ_x rec_nll(x) + Σ_x KL(x)) / #sentences
    MI       = E_x E_q(z|x) log q(z|x) − E_x E_q(z|x) log q(z)                                   (calc_mi)
    AU       = #{i : Var_x(mean_i(x)) ≥ δ}                                                       (calc_au)

Sampling is z = mean + exp(logvar / 2)·ε throughout. Where the released AdaVAE evaluation differs, this module
follows the definitions above on purpose: its importance weights add log q(z|x) and subtract log p(z) (the
sign of both is reversed here), it samples with the log-variance in place of the standard deviation, it
counts tokens that are never scored (the first) in the perplexity's denominator, and it divides sums of
per-batch means by token totals. Here every sum runs over sentences and the token count is the number of
scored tokens, the ones log p(x|z) sums over.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from ...errors import ConfigError
from .objective import _count, _number, check_posterior, reparameterize

LOG_2PI = math.log(2 * math.pi)


def _log_normal(z: Tensor, mean: Tensor, logvar: Tensor) -> Tensor:
    """log N(z; mean, diag(exp(logvar))) summed over the last dimension (shapes broadcast)."""
    d = z.shape[-1]
    return -0.5 * ((z - mean).pow(2) / logvar.exp()).sum(-1) - 0.5 * (d * LOG_2PI + logvar.sum(-1))


class ImportanceWeighted(NamedTuple):
    log_px: Tensor  # (B,) logsumexp_k [log p(x|z_k) + log p(z_k) − log q(z_k|x)] − log K
    log_px_given_z: Tensor  # (B,) (1/K) Σ_k log p(x|z_k): the reconstruction term of a K-sample ELBO


def importance_weighted_log_px(log_px_given_z: Callable[[Tensor], Tensor], mean: Tensor, logvar: Tensor,
                               samples: int = 100, chunk: int = 10,
                               generator: torch.Generator | None = None) -> ImportanceWeighted:
    """Importance-weighted estimate of log p(x) per sentence with K = `samples` draws from q(z|x).

    `log_px_given_z(z)` takes z (B, k, d) and returns (B, k): log p(x_b | z_bk) summed over the sentence's
    scored tokens. It is called on `chunk` samples at a time (the last call may get fewer), so memory stays
    that of `chunk` decoder passes; the K log-weights (B, K) are kept and combined at the end. z is drawn
    chunk by chunk from `generator`, so the same generator state and chunk give the same estimate.
    Returns log p(x) and the mean of log p(x|z_k) over the same samples (Optimus's calc_iwnll: K=100)."""
    check_posterior(mean, logvar, "importance_weighted_log_px")
    if not _count(samples) or samples < 1:
        raise ConfigError(f"importance_weighted_log_px: samples must be an integer ≥ 1, got {samples!r}")
    if not _count(chunk) or chunk < 1:
        raise ConfigError(f"importance_weighted_log_px: chunk must be an integer ≥ 1, got {chunk!r}")
    B, d = mean.shape
    weights, recs = [], []
    for start in range(0, samples, chunk):
        k = min(chunk, samples - start)
        mu, lv = mean.unsqueeze(1).expand(B, k, d), logvar.unsqueeze(1).expand(B, k, d)  # (B, k, d)
        z = reparameterize(mu, lv, generator)  # (B, k, d)
        rec = log_px_given_z(z)
        if not isinstance(rec, Tensor) or rec.shape != (B, k):
            got = tuple(rec.shape) if isinstance(rec, Tensor) else type(rec).__name__
            raise ConfigError(f"importance_weighted_log_px: log_px_given_z must return (batch, samples) = "
                              f"{(B, k)} for z of shape {tuple(z.shape)}, got {got}")
        if not torch.isfinite(rec).all():
            raise ConfigError("importance_weighted_log_px: log_px_given_z returned NaN or inf")
        rec = rec.to(mean.dtype)
        log_prior = -0.5 * (z.pow(2).sum(-1) + d * LOG_2PI)  # (B, k) log N(z; 0, I)
        log_q = _log_normal(z, mu, lv)  # (B, k)
        weights.append(rec + log_prior - log_q)
        recs.append(rec)
    log_w = torch.cat(weights, dim=1)  # (B, K)
    log_px = torch.logsumexp(log_w, dim=1) - math.log(samples)  # (B,)
    return ImportanceWeighted(log_px, torch.cat(recs, dim=1).mean(dim=1))


def perplexity(total_log_px: float | Tensor, total_tokens: int | Tensor) -> float:
    """exp(−Σ log p(x) / Σ tokens): the sums over every sentence of the set, tokens those p(x|z) scores."""
    if isinstance(total_log_px, Tensor):
        total_log_px = total_log_px.item() if total_log_px.numel() == 1 else total_log_px
    if isinstance(total_tokens, Tensor) and total_tokens.numel() == 1 and not total_tokens.is_floating_point():
        total_tokens = int(total_tokens.item())
    if not _number(total_log_px):
        raise ConfigError(f"perplexity: total_log_px must be a finite number, got {total_log_px!r}")
    if not _count(total_tokens) or total_tokens < 1:
        raise ConfigError(f"perplexity: total_tokens must be an integer ≥ 1 (scored tokens), got {total_tokens!r}")
    try:
        return math.exp(-total_log_px / total_tokens)
    except OverflowError:
        return math.inf


def neg_elbo(rec_nll_sum: float | Tensor, kl_sum: float | Tensor, n_sentences: int) -> float:
    """−ELBO per sentence: (Σ_x −log p(x|z) + Σ_x KL(q(z|x) ‖ p(z))) / #sentences, in nats."""
    values = []
    for name, v in (("rec_nll_sum", rec_nll_sum), ("kl_sum", kl_sum)):
        v = v.item() if isinstance(v, Tensor) and v.numel() == 1 else v
        if not _number(v):
            raise ConfigError(f"neg_elbo: {name} must be a finite number, got {v!r}")
        values.append(float(v))
    if not _count(n_sentences) or n_sentences < 1:
        raise ConfigError(f"neg_elbo: n_sentences must be an integer ≥ 1, got {n_sentences!r}")
    return (values[0] + values[1]) / n_sentences


def mutual_information(mean: Tensor, logvar: Tensor, generator: torch.Generator | None = None,
                       chunk: int = 256) -> float:
    """I(x; z) under q over the whole evaluation set of N sentences (Optimus's calc_mi), in nats:

        neg_entropy = (1/N) Σ_n [−½ d log 2π − ½ Σ_i (1 + logvar_ni)]             E_x E_q log q(z|x)
        z_n         = mean_n + exp(logvar_n / 2)·ε_n,  one draw per sentence, ε ~ N(0, I) (N, d) at once
        log q(z_n)  = logsumexp_m log N(z_n; mean_m, exp(logvar_m)) − log N       aggregate posterior, all m
        MI          = neg_entropy − (1/N) Σ_n log q(z_n)

    `mean`, `logvar` are (N, d): every sentence's posterior. The N × N densities are computed `chunk` rows
    of z at a time; the result does not depend on `chunk`."""
    check_posterior(mean, logvar, "mutual_information")
    if not _count(chunk) or chunk < 1:
        raise ConfigError(f"mutual_information: chunk must be an integer ≥ 1, got {chunk!r}")
    if mean.dtype not in (torch.float32, torch.float64):
        mean, logvar = mean.float(), logvar.float()
    N, d = mean.shape
    neg_entropy = (-0.5 * d * LOG_2PI - 0.5 * (1.0 + logvar).sum(-1)).mean()
    z = reparameterize(mean, logvar, generator)  # (N, d)
    log_qz = mean.new_zeros(())
    for start in range(0, N, chunk):
        zc = z[start:start + chunk].unsqueeze(1)  # (n, 1, d)
        log_density = _log_normal(zc, mean.unsqueeze(0), logvar.unsqueeze(0))  # (n, N)
        log_qz = log_qz + (torch.logsumexp(log_density, dim=1) - math.log(N)).sum()
    return (neg_entropy - log_qz / N).item()


def active_units(means: Tensor, threshold: float = 0.01) -> tuple[int, Tensor]:
    """Active units (Optimus's calc_au, δ = 0.01): the count of dimensions i with Var_x(mean_i) ≥ threshold.

    means (N, d) are the posterior means of every sentence; the variance is the unbiased one,
    Σ_n (mean_ni − m̄_i)² / (N − 1), as calc_au. Returns (count, variances (d,))."""
    if not isinstance(means, Tensor) or not means.is_floating_point() or means.dim() != 2:
        got = f"shape {tuple(means.shape)} {means.dtype}" if isinstance(means, Tensor) else type(means).__name__
        raise ConfigError(f"active_units: means must be a float tensor (sentences, latent_dim), got {got}")
    if means.shape[0] < 2 or means.shape[1] < 1:
        raise ConfigError(f"active_units: need at least 2 sentences and 1 dimension, got {tuple(means.shape)}")
    if not torch.isfinite(means).all():
        raise ConfigError("active_units: means hold NaN or inf")
    if not _number(threshold) or threshold < 0:
        raise ConfigError(f"active_units: threshold must be a finite number ≥ 0, got {threshold!r}")
    centred = means - means.mean(dim=0, keepdim=True)  # (N, d)
    variances = centred.pow(2).sum(dim=0) / (means.shape[0] - 1)  # (d,)
    return int((variances >= threshold).sum().item()), variances
