"""The VAE objective: KL per dimension, free bits in both forms (values and gradients), cyclical β, sampling."""
import math

import pytest
import torch

from adaptune.errors import ConfigError
from adaptune.experiments.vae.objective import cyclical_beta, gaussian_kl, kl_term, reparameterize


def test_gaussian_kl_hand_values():
    mean = torch.tensor([[1.0, 0.0, 0.0, -2.0]])
    logvar = torch.tensor([[0.0, math.log(2.0), 0.0, math.log(0.5)]])
    want = torch.tensor([[0.5, 0.5 * (1 - math.log(2.0)), 0.0, 0.5 * (4 + 0.5 + math.log(2.0) - 1)]])
    torch.testing.assert_close(gaussian_kl(mean, logvar), want)


def test_gaussian_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros(5, 3), torch.ones(5, 3))
    torch.testing.assert_close(gaussian_kl(mean, logvar), torch.distributions.kl_divergence(q, p))


def _posterior(values):
    """Means giving per-sample, per-dimension KL ½·mean² (logvar 0), with gradients."""
    mean = torch.tensor(values, dtype=torch.float64, requires_grad=True)
    return mean, torch.zeros_like(mean)


def test_total_free_bits_above_threshold_is_the_batch_mean_kl_with_its_gradient():
    mean, logvar = _posterior([[1.0, 2.0], [3.0, 0.0]])  # KL per sample 2.5, 4.5: batch mean 3.5
    term = kl_term(mean, logvar, free_bits=1.0)  # threshold λ·d = 2.0
    assert term.item() == pytest.approx(3.5)
    term.backward()
    torch.testing.assert_close(mean.grad, mean.detach() / 2)  # d/dμ (1/B) Σ ½μ² = μ / B


def test_total_free_bits_below_threshold_is_constant_without_gradient():
    mean, logvar = _posterior([[1.0, 2.0], [3.0, 0.0]])
    term = kl_term(mean, logvar, free_bits=2.0)  # threshold 4.0 > 3.5
    assert term.item() == pytest.approx(4.0)
    term.backward()
    assert torch.equal(mean.grad, torch.zeros_like(mean))


def test_total_free_bits_at_threshold():
    mean, logvar = _posterior([[1.0, 2.0], [3.0, 0.0]])
    assert kl_term(mean, logvar, free_bits=1.75).item() == pytest.approx(3.5)
    mean, logvar = _posterior([[0.0, 0.0]])
    assert kl_term(mean, logvar, free_bits=0.0).item() == 0.0


def test_total_form_clamps_the_sum_not_each_dimension():
    # one dimension far above λ, one at 0: the per-dimension form lifts the second, the total form does not
    mean, logvar = _posterior([[2.0, 0.0]])  # KL 2.0, 0.0
    assert kl_term(mean, logvar, free_bits=0.5).item() == pytest.approx(2.0)
    assert kl_term(mean, logvar, free_bits=0.5, per_dim=True).item() == pytest.approx(2.5)


def test_per_dim_free_bits_values_and_gradients():
    # batch-mean KL per dimension: (0.5 + 4.5)/2 = 2.5, (2 + 0)/2 = 1.0, 0.125/2 = 0.0625
    mean, logvar = _posterior([[1.0, 2.0, 0.5], [3.0, 0.0, 0.0]])
    term = kl_term(mean, logvar, free_bits=1.0, per_dim=True)
    assert term.item() == pytest.approx(2.5 + 1.0 + 1.0)  # dim 1 at the threshold, dim 2 below it
    term.backward()
    want = mean.detach() / 2
    want[:, 2] = 0.0  # clamped: no gradient
    torch.testing.assert_close(mean.grad, want)  # at equality (dim 1) the gradient passes


def test_per_dim_takes_the_batch_mean_before_the_max():
    # per sample KL_0: 0 and 2 (mean 1.0): max over the batch mean, not over each sample
    mean, logvar = _posterior([[0.0], [2.0]])
    assert kl_term(mean, logvar, free_bits=0.5, per_dim=True).item() == pytest.approx(1.0)
    assert kl_term(mean, logvar, free_bits=1.5, per_dim=True).item() == pytest.approx(1.5)


def test_logvar_gets_gradient_above_threshold():
    mean = torch.zeros(2, 3, requires_grad=True)
    logvar = torch.full((2, 3), 1.0, requires_grad=True)
    kl_term(mean, logvar, free_bits=0.0).backward()
    torch.testing.assert_close(logvar.grad, torch.full((2, 3), 0.5 * (math.e - 1) / 2))


@pytest.mark.parametrize("free_bits", [-0.1, math.nan, math.inf, True, "0.5", None])
def test_kl_term_rejects_bad_free_bits(free_bits):
    with pytest.raises(ConfigError, match="free_bits"):
        kl_term(torch.zeros(2, 3), torch.zeros(2, 3), free_bits)


@pytest.mark.parametrize("mean, logvar, match", [
    (torch.zeros(2, 3), torch.zeros(2, 4), "differ in shape"),
    (torch.zeros(3), torch.zeros(3), r"\(batch, latent_dim\)"),
    (torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), "float tensor"),
    (torch.tensor([[0.0, math.nan]]), torch.zeros(1, 2), "NaN or inf"),
    (torch.zeros(1, 2), torch.tensor([[0.0, math.inf]]), "NaN or inf"),
    (torch.zeros(0, 2), torch.zeros(0, 2), "empty"),
])
def test_bad_posteriors_are_refused(mean, logvar, match):
    with pytest.raises(ConfigError, match=match):
        kl_term(mean, logvar, 0.5)


@pytest.mark.parametrize("step, beta", [
    (0, 0.0), (6, 0.0),  # f = 0.24: still in the zero phase
    (7, 0.12), (10, 0.6), (12, 0.92),  # rising: (f − 0.25) / 0.25
    (13, 1.0), (24, 1.0),  # plateau
    (25, 0.0), (31, 0.0), (37, 0.92), (50, 0.0), (75, 0.0), (88, 1.0), (99, 1.0),  # later cycles
    (100, 1.0), (1000, 1.0),  # past the schedule
])
def test_cyclical_beta_default_four_cycles(step, beta):
    assert cyclical_beta(step, 100) == pytest.approx(beta)


def test_cyclical_beta_mid_rise_and_boundaries_of_a_long_schedule():
    b = [cyclical_beta(s, 400) for s in range(400)]  # period 100: 25 at 0, 25 rising, 50 at 1
    assert b[0] == b[24] == b[25] == 0.0
    assert b[26] == pytest.approx(0.04) and b[37] == pytest.approx(0.48) and b[38] == pytest.approx(0.52)
    assert b[50] == b[99] == 1.0 and b[100] == 0.0 and b[150] == 1.0 and b[325] == 0.0 and b[399] == 1.0
    assert all(0.0 <= v <= 1.0 for v in b)
    assert sum(v == 0.0 for v in b) == 4 * 26 and sum(v == 1.0 for v in b) == 4 * 50


def test_cyclical_beta_other_shapes():
    assert cyclical_beta(25, 100, cycles=1, zero=0.0, rise=0.5) == pytest.approx(0.5)  # Fu et al.'s 0.5 ramp
    assert cyclical_beta(60, 100, cycles=1, zero=0.0, rise=0.5) == 1.0
    assert cyclical_beta(3, 10, cycles=2, zero=0.7, rise=0.3) == 0.0  # 3/5 of its cycle
    assert cyclical_beta(4, 10, cycles=2, zero=0.2, rise=0.8) == pytest.approx(0.75)
    assert cyclical_beta(0, 1, cycles=1) == 0.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(zero=0.6, rise=0.5), "zero \\+ rise"),
    (dict(zero=-0.1), "zero"),
    (dict(zero=math.nan), "zero"),
    (dict(rise=0.0), "rise"),
    (dict(rise=math.inf), "rise"),
    (dict(cycles=0), "cycles"),
    (dict(cycles=101), "cycles"),
    (dict(cycles=2.0), "cycles"),
    (dict(total_steps=0), "total_steps"),
    (dict(total_steps=True), "total_steps"),
    (dict(step=-1), "step"),
    (dict(step=1.5), "step"),
])
def test_cyclical_beta_rejects_bad_arguments(kwargs, match):
    args = dict(step=0, total_steps=100) | kwargs
    with pytest.raises(ConfigError, match=match):
        cyclical_beta(**args)


def test_reparameterize_uses_the_standard_deviation_and_the_generator():
    mean = torch.tensor([[1.0, -2.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(4.0), math.log(0.01)]])
    z = reparameterize(mean, logvar, torch.Generator().manual_seed(3))
    eps = torch.randn(1, 3, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(z, mean + torch.tensor([[1.0, 2.0, 0.1]]) * eps)
    torch.testing.assert_close(reparameterize(mean, logvar, torch.Generator().manual_seed(3)), z)


def test_reparameterize_is_differentiable_and_matches_moments():
    mean = torch.full((20000, 2), 0.5, requires_grad=True)
    logvar = torch.full((20000, 2), math.log(9.0), requires_grad=True)
    z = reparameterize(mean, logvar, torch.Generator().manual_seed(0))
    assert abs(z.mean().item() - 0.5) < 0.1 and abs(z.std().item() - 3.0) < 0.1
    z.sum().backward()
    assert torch.equal(mean.grad, torch.ones_like(mean)) and logvar.grad.abs().sum() > 0


def test_reparameterize_refuses_bad_input():
    with pytest.raises(ConfigError, match="one shape"):
        reparameterize(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(ConfigError, match="NaN or inf"):
        reparameterize(torch.zeros(2), torch.tensor([0.0, math.nan]))
