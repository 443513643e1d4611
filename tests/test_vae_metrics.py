"""VAE metrics against closed forms: importance-weighted log p(x) on a linear-Gaussian model, MI of Gaussian
mixtures, AU on means of known variance, perplexity and −ELBO arithmetic, and the errors on bad input."""
import math

import pytest
import torch
from torch.distributions import MultivariateNormal, Normal

from adaptune.errors import ConfigError
from adaptune.experiments.vae.metrics import (active_units, importance_weighted_log_px, mutual_information,
                                              neg_elbo, perplexity)

D64 = torch.float64


class LinearGaussian:
    """z ~ N(0, I_d), x = W z + b + ε, ε ~ N(0, s² I): p(x) = N(b, W Wᵀ + s² I). W's columns are orthogonal,
    so the exact posterior is the diagonal Gaussian N(v·Wᵀ(x − b)/s², v), v_i = 1 / (1 + c_i² / s²)."""

    def __init__(self, d=3, D=5, s=0.5, seed=0):
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(D, d, generator=g, dtype=D64))
        self.c = torch.tensor([1.5, 0.7, 2.0], dtype=D64)[:d]
        self.W, self.b, self.s = q * self.c, torch.randn(D, generator=g, dtype=D64), s
        z, eps = torch.randn(16, d, generator=g, dtype=D64), torch.randn(16, D, generator=g, dtype=D64)
        self.x = z @ self.W.T + self.b + s * eps  # (B, D)

    def log_px(self):
        cov = self.W @ self.W.T + self.s ** 2 * torch.eye(len(self.b), dtype=D64)
        return MultivariateNormal(self.b, cov).log_prob(self.x)  # (B,)

    def posterior(self):
        v = 1.0 / (1.0 + self.c ** 2 / self.s ** 2)  # (d,)
        mean = v * ((self.x - self.b) @ self.W) / self.s ** 2  # (B, d)
        return mean, v.log().expand_as(mean).clone()

    def log_px_given_z(self, z):  # z (B, k, d) -> (B, k)
        return Normal(z @ self.W.T + self.b, self.s).log_prob(self.x.unsqueeze(1)).sum(-1)


def test_exact_posterior_gives_the_exact_log_likelihood_for_any_k():
    m = LinearGaussian()
    mean, logvar = m.posterior()
    for k, chunk in [(1, 1), (7, 3), (50, 10)]:
        est = importance_weighted_log_px(m.log_px_given_z, mean, logvar, samples=k, chunk=chunk,
                                         generator=torch.Generator().manual_seed(k))
        torch.testing.assert_close(est.log_px, m.log_px(), rtol=0, atol=1e-9)


def test_perturbed_posterior_converges_as_k_grows():
    m = LinearGaussian(seed=1)
    mean, logvar = m.posterior()
    mean, logvar = mean + 0.3, logvar + 0.4  # a wrong but overlapping q
    exact = m.log_px()
    err = {}
    for k in (1, 100, 20000):
        est = importance_weighted_log_px(m.log_px_given_z, mean, logvar, samples=k, chunk=5000,
                                         generator=torch.Generator().manual_seed(0)).log_px
        err[k] = (exact - est).abs().mean().item()
    assert err[1] > 0.3  # K = 1 is a one-sample ELBO: off by about KL(q ‖ posterior)
    # past the first few samples the error falls as 1/√K: about 0.13 at K = 100, so about 0.01 at 20,000
    assert err[1] > err[100] > 4 * err[20000]
    assert err[20000] < 0.025


def test_weights_are_log_p_x_given_z_plus_log_prior_minus_log_q_over_the_drawn_samples():
    m = LinearGaussian(seed=2)
    mean, logvar = m.posterior()
    mean, logvar = mean - 0.5, logvar - 0.3
    seen = []

    def recording(z):
        seen.append(z.clone())
        return m.log_px_given_z(z)

    est = importance_weighted_log_px(recording, mean, logvar, samples=7, chunk=3,
                                     generator=torch.Generator().manual_seed(5))
    assert [z.shape for z in seen] == [(16, 3, 3), (16, 3, 3), (16, 1, 3)]
    z = torch.cat(seen, dim=1)  # (B, 7, d)
    g = torch.Generator().manual_seed(5)  # the samples are mean + exp(logvar / 2) · ε, chunk by chunk
    eps = torch.cat([torch.randn(16, k, 3, generator=g, dtype=D64) for k in (3, 3, 1)], dim=1)
    torch.testing.assert_close(z, mean.unsqueeze(1) + (0.5 * logvar).exp().unsqueeze(1) * eps)
    log_w = (m.log_px_given_z(z) + Normal(0.0, 1.0).log_prob(z).sum(-1)
             - Normal(mean.unsqueeze(1), (0.5 * logvar).exp().unsqueeze(1)).log_prob(z).sum(-1))
    torch.testing.assert_close(est.log_px, torch.logsumexp(log_w, 1) - math.log(7))
    torch.testing.assert_close(est.log_px_given_z, m.log_px_given_z(z).mean(1))
    again = importance_weighted_log_px(m.log_px_given_z, mean, logvar, samples=7, chunk=3,
                                       generator=torch.Generator().manual_seed(5))
    assert torch.equal(again.log_px, est.log_px)


@pytest.mark.parametrize("fn, kwargs, match", [
    (lambda z: z.sum(-1).sum(-1), {}, r"must return \(batch, samples\)"),
    (lambda z: z.sum(-1) * math.nan, {}, "NaN or inf"),
    (lambda z: [0.0], {}, "must return"),
    (lambda z: z.sum(-1), dict(samples=0), "samples"),
    (lambda z: z.sum(-1), dict(chunk=0), "chunk"),
    (lambda z: z.sum(-1), dict(samples=2.0), "samples"),
])
def test_importance_weighted_refuses_bad_input(fn, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        importance_weighted_log_px(fn, torch.zeros(2, 3), torch.zeros(2, 3), **kwargs)
    with pytest.raises(ConfigError, match="NaN or inf"):
        importance_weighted_log_px(lambda z: z.sum(-1), torch.zeros(2, 3), torch.full((2, 3), math.inf))


def test_perplexity_and_neg_elbo_arithmetic():
    assert perplexity(-20.0, 10) == pytest.approx(math.exp(2.0))
    assert perplexity(torch.tensor(-20.0, dtype=D64), torch.tensor(10)) == pytest.approx(math.exp(2.0))
    assert perplexity(0.0, 3) == 1.0
    assert neg_elbo(300.0, torch.tensor(30.0), 10) == pytest.approx(33.0)


@pytest.mark.parametrize("args, match", [
    ((-1.0, 0), "total_tokens"), ((-1.0, -3), "total_tokens"), ((-1.0, 2.5), "total_tokens"),
    ((math.nan, 3), "total_log_px"), ((-math.inf, 3), "total_log_px"), ((torch.zeros(2), 3), "total_log_px"),
])
def test_perplexity_refuses_bad_input(args, match):
    with pytest.raises(ConfigError, match=match):
        perplexity(*args)


def test_neg_elbo_refuses_bad_input():
    with pytest.raises(ConfigError, match="n_sentences"):
        neg_elbo(1.0, 1.0, 0)
    with pytest.raises(ConfigError, match="kl_sum"):
        neg_elbo(1.0, math.nan, 3)


def _optimus_mi(mean, logvar, z):
    """calc_mi written out for one draw z per sentence, one sentence at a time."""
    N, d = mean.shape
    neg_entropy = sum(-0.5 * d * math.log(2 * math.pi) - 0.5 * (1 + logvar[n]).sum() for n in range(N)) / N
    log_qz = 0.0
    for n in range(N):
        dens = Normal(mean, (0.5 * logvar).exp()).log_prob(z[n]).sum(-1)  # (N,) log q(z_n | x_m)
        log_qz += torch.logsumexp(dens, 0) - math.log(N)
    return (neg_entropy - log_qz / N).item()


def test_mi_follows_calc_mi_with_one_draw_per_sentence_for_any_chunk():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(40, 3, generator=g, dtype=D64), torch.randn(40, 3, generator=g, dtype=D64) - 1
    z = mean + (0.5 * logvar).exp() * torch.randn(40, 3, generator=torch.Generator().manual_seed(9), dtype=D64)
    want = _optimus_mi(mean, logvar, z)
    for chunk in (1, 7, 256):
        got = mutual_information(mean, logvar, torch.Generator().manual_seed(9), chunk=chunk)
        assert got == pytest.approx(want, abs=1e-10)


def test_mi_is_zero_when_the_posterior_ignores_x():
    N, d = 4000, 4  # the estimate is a mean of N terms with variance d/2: std ≈ 0.016
    mean, logvar = torch.full((N, d), 0.7), torch.full((N, d), -0.5)
    mi = mutual_information(mean, logvar, torch.Generator().manual_seed(1))
    assert abs(mi) < 0.08


def _mixture_mi(a, sigma):
    """I(x; z) for x ∈ {−a, +a} equally likely and z | x ~ N(x, σ²): H(mixture) − H(N(0, σ²)), by quadrature."""
    grid = torch.linspace(-a - 12 * sigma, a + 12 * sigma, 200001, dtype=D64)
    dens = 0.5 * (Normal(-a, sigma).log_prob(grid).exp() + Normal(a, sigma).log_prob(grid).exp())
    h = -torch.trapezoid(dens * dens.clamp_min(1e-300).log(), grid)
    return (h - 0.5 * math.log(2 * math.pi * math.e * sigma ** 2)).item()


@pytest.mark.parametrize("a, sigma", [(1.0, 0.8), (5.0, 0.1)])  # overlapping, and separated (MI → log 2)
def test_mi_of_a_two_component_mixture(a, sigma):
    N = 4000  # the terms' std is below 1 nat: the estimate's std is below 0.016
    mean = torch.cat([torch.full((N // 2, 1), -a), torch.full((N // 2, 1), a)]).double()
    logvar = torch.full((N, 1), 2 * math.log(sigma), dtype=D64)
    want = _mixture_mi(a, sigma)
    if a == 5.0:
        assert want == pytest.approx(math.log(2), abs=1e-6)
    mi = mutual_information(mean, logvar, torch.Generator().manual_seed(2))
    assert mi == pytest.approx(want, abs=0.06)


def test_mi_refuses_bad_input():
    with pytest.raises(ConfigError, match="differ in shape"):
        mutual_information(torch.zeros(3, 2), torch.zeros(3, 1))
    with pytest.raises(ConfigError, match="chunk"):
        mutual_information(torch.zeros(3, 2), torch.zeros(3, 2), chunk=0)


def test_active_units_uses_the_unbiased_variance_of_the_means():
    # ±c alternating: mean 0, Σ (m − m̄)² = N c²; unbiased variance N c² / (N − 1), biased c²
    N = 4
    cols = [0.0, 0.095, 0.2, 1.0]  # c² = 0, 0.009025 (< 0.01 biased, 0.01203 unbiased), 0.04, 1
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=D64).unsqueeze(1)
    means = sign * torch.tensor(cols, dtype=D64) + torch.tensor([3.0, -1.0, 0.5, 0.0], dtype=D64)
    count, var = active_units(means)
    torch.testing.assert_close(var, torch.tensor(cols, dtype=D64) ** 2 * N / (N - 1))
    assert count == 3
    assert active_units(means, threshold=0.06)[0] == 1  # 0.0533 below it
    assert active_units(means, threshold=0.0)[0] == 4


def test_active_units_on_random_means_with_known_variances():
    g = torch.Generator().manual_seed(0)
    std = torch.tensor([0.0, 0.03, 0.3, 1.0, 2.0])  # variances 0, 0.0009, 0.09, 1, 4
    means = torch.randn(5000, 5, generator=g) * std + 1.0
    count, var = active_units(means)
    assert count == 3
    torch.testing.assert_close(var, torch.var(means, dim=0, correction=1))
    torch.testing.assert_close(var, std ** 2, rtol=0.06, atol=1e-6)


@pytest.mark.parametrize("means, threshold, match", [
    (torch.zeros(1, 3), 0.01, "at least 2"),
    (torch.zeros(3), 0.01, r"\(sentences, latent_dim\)"),
    (torch.tensor([[0.0], [math.nan]]), 0.01, "NaN or inf"),
    (torch.zeros(3, 2), -1.0, "threshold"),
    (torch.zeros(3, 2), math.nan, "threshold"),
])
def test_active_units_refuses_bad_input(means, threshold, match):
    with pytest.raises(ConfigError, match=match):
        active_units(means, threshold)
