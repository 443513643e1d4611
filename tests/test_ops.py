"""Reference ops against straightforward, materialised math (float64, random shapes and ranks)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptune import ops

settings.register_profile("adaptune-ops", max_examples=25, deadline=None, derandomize=True)
ops_settings = settings(settings.get_profile("adaptune-ops"))


@st.composite
def problems(draw):
    """Shapes x (batch, tokens, in), W (out, in), A (r, in), B (out, r), m (out,), and a scale."""
    d_in, d_out = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    r = draw(st.integers(1, min(d_in, d_out)))
    batch, tokens = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    scale = draw(st.floats(0.25, 4.0))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    t = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    return dict(x=t(batch, tokens, d_in), W=t(d_out, d_in), b=t(d_out), A=t(r, d_in), B=t(d_out, r),
                m=t(d_out).abs() + 0.5, s=scale)


def merged(p):
    return p["W"] + p["s"] * p["B"] @ p["A"]  # (out, in), materialised


@ops_settings
@given(problems())
def test_lora_equals_base_plus_scaled_low_rank_term(p):
    x, W, b, A, B, s = p["x"], p["W"], p["b"], p["A"], p["B"], p["s"]
    expected = x @ W.T + b + s * (x @ A.T) @ B.T
    torch.testing.assert_close(ops.lora(x, W, b, A, B, s), expected)
    torch.testing.assert_close(ops.lora(x, W, None, A, B, s), expected - b)


@ops_settings
@given(problems())
def test_dora_norm_equals_row_norms_of_the_materialised_weight(p):
    expected = merged(p).norm(dim=1)
    torch.testing.assert_close(ops.dora_norm(p["W"], p["A"], p["B"], p["s"]), expected)
    cached = p["W"].pow(2).sum(1)
    torch.testing.assert_close(ops.dora_norm(p["W"], p["A"], p["B"], p["s"], cached), expected)


@ops_settings
@given(problems())
def test_dora_equals_magnitude_over_norm_times_merged_projection(p):
    Wm = merged(p)
    expected = (p["m"] / Wm.norm(dim=1)) * (p["x"] @ Wm.T) + p["b"]
    got = ops.dora(p["x"], p["W"], p["b"], p["A"], p["B"], p["m"], p["s"])
    torch.testing.assert_close(got, expected)


def _dora_grads(p, detach_norm):
    A, B, m = (p[k].clone().requires_grad_(True) for k in ("A", "B", "m"))
    y = ops.dora(p["x"], p["W"], p["b"], A, B, m, p["s"], detach_norm=detach_norm)
    w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)  # a non-trivial loss
    return torch.autograd.grad((y * w).sum(), (A, B, m)), w


def _formula_grads(p, w, constant_norm):
    A, B, m = (p[k].clone().requires_grad_(True) for k in ("A", "B", "m"))
    Wm = p["W"] + p["s"] * B @ A
    n = Wm.norm(dim=1)
    if constant_norm:
        n = n.detach()
    y = (m / n) * (p["x"] @ Wm.T) + p["b"]
    return torch.autograd.grad((y * w).sum(), (A, B, m))


@pytest.mark.parametrize("detach_norm", [False, True], ids=["through-the-norm", "norm-detached"])
@ops_settings
@given(p=problems())
def test_dora_gradients_match_the_materialised_formula(p, detach_norm):
    """detach_norm=False backpropagates through n; True treats n as a constant (DoRA §4.3)."""
    got, w = _dora_grads(p, detach_norm=detach_norm)
    for g, e in zip(got, _formula_grads(p, w, constant_norm=detach_norm)):
        torch.testing.assert_close(g, e)


def test_detached_and_live_norm_give_different_gradients():
    g = torch.Generator().manual_seed(0)
    p = dict(x=torch.randn(2, 3, 6, generator=g, dtype=torch.float64),
             W=torch.randn(5, 6, generator=g, dtype=torch.float64), b=torch.zeros(5, dtype=torch.float64),
             A=torch.randn(2, 6, generator=g, dtype=torch.float64),
             B=torch.randn(5, 2, generator=g, dtype=torch.float64),
             m=torch.rand(5, generator=g, dtype=torch.float64) + 0.5, s=1.0)
    live, _ = _dora_grads(p, detach_norm=False)
    detached, _ = _dora_grads(p, detach_norm=True)
    assert not torch.allclose(live[0], detached[0])


ACTS = {
    "relu": lambda t: t.clamp_min(0),
    "gelu": lambda t: 0.5 * t * (1 + torch.erf(t / math.sqrt(2))),
    "gelu_tanh": lambda t: 0.5 * t * (1 + torch.tanh(math.sqrt(2 / math.pi) * (t + 0.044715 * t**3))),
    "silu": lambda t: t / (1 + torch.exp(-t)),
    "tanh": lambda t: (torch.exp(t) - torch.exp(-t)) / (torch.exp(t) + torch.exp(-t)),
    "identity": lambda t: t,
}


def test_every_activation_has_an_independent_check():
    assert set(ACTS) == set(ops.ACTIVATIONS)


@pytest.mark.parametrize("act", sorted(ACTS))
@ops_settings
@given(d_in=st.integers(1, 10), d=st.integers(1, 10), m=st.integers(1, 6), scale=st.floats(0.1, 3.0),
       seed=st.integers(0, 1000))
def test_bottleneck_equals_residual_plus_scaled_up_act_down(act, d_in, d, m, scale, seed):
    g = torch.Generator().manual_seed(seed)
    t = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    x, h, Wd, bd, Wu, bu = t(2, 3, d_in), t(2, 3, d), t(m, d_in), t(m), t(d, m), t(d)
    expected = h + scale * (ACTS[act](x @ Wd.T + bd) @ Wu.T + bu)
    torch.testing.assert_close(ops.bottleneck(x, h, Wd, bd, Wu, bu, scale, act), expected)
    no_bias = h + scale * (ACTS[act](x @ Wd.T) @ Wu.T)
    torch.testing.assert_close(ops.bottleneck(x, h, Wd, None, Wu, None, scale, act), no_bias)


def test_lora_dropout_applies_to_the_low_rank_input_only_in_training():
    g = torch.Generator().manual_seed(0)
    x, W, b = torch.randn(4, 8, generator=g), torch.randn(6, 8, generator=g), torch.randn(6, generator=g)
    A, B = torch.randn(3, 8, generator=g), torch.randn(6, 3, generator=g)
    plain = ops.lora(x, W, b, A, B, 2.0)
    assert torch.equal(ops.lora(x, W, b, A, B, 2.0, dropout=0.5, training=False), plain)
    torch.manual_seed(7)
    dropped = ops.lora(x, W, b, A, B, 2.0, dropout=0.5, training=True)
    torch.manual_seed(7)
    mask_x = torch.nn.functional.dropout(x, 0.5, True)
    torch.testing.assert_close(dropped, x @ W.T + b + 2.0 * (mask_x @ A.T) @ B.T)
    assert not torch.allclose(dropped, plain)
