"""The routed kernels (a task per sample) against the reference's loop over tasks, on every device with
kernels: random task assignments, tasks with no samples, one task, samples with no task (-1); forward and
backward, opcheck, float64 gradcheck. The fixtures are test_kernels.py's (kernels required)."""
import pytest
import test_kernels
import torch
from test_kernels import TIGHT, grads, tensors

from adaptune import ops
from adaptune.ops import reference

require_kernels, device, kernels = test_kernels.require_kernels, test_kernels.device, test_kernels.kernels  # fixtures

ASSIGNMENTS = {
    "random": lambda g, n, t: torch.randint(-1, t, (n,), generator=g),
    "one task": lambda g, n, t: torch.full((n,), 1),
    "empty tasks": lambda g, n, t: torch.tensor([0, 2] * (n // 2) + [0] * (n % 2)),  # tasks 1 and 3 get none
    "none": lambda g, n, t: torch.full((n,), -1),
    "sorted": lambda g, n, t: torch.sort(torch.randint(0, t, (n,), generator=g)).values,
}


def problem(device, seed=0, n=6, lead=(5,), d_in=12, d_out=10, r=3, tasks=4, assignment="random"):
    t = tensors(seed, device=device)
    g = torch.Generator().manual_seed(seed)
    return dict(x=t(n, *lead, d_in), W=t(d_out, d_in) / d_in**0.5, b=t(d_out), A=t(tasks, r, d_in) / d_in**0.5,
                B=t(tasks, d_out, r) / r**0.5, m=t(tasks, d_out).abs() + 0.5,
                scale=torch.tensor([0.5, 1.0, 2.0, 1.5][:tasks], device=device),
                index=ASSIGNMENTS[assignment](g, n, tasks).to(device))


def assert_same(got, want):
    """Outputs and gradients alike; a table no sample used has no gradient in the reference, zeros here."""
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w if w is not None else torch.zeros_like(g), **TIGHT)


def norms(p):
    return torch.stack([reference.dora_norm(p["W"], p["A"][t], p["B"][t], float(p["scale"][t]))
                        for t in range(p["A"].shape[0])])


@pytest.mark.parametrize("assignment", sorted(ASSIGNMENTS))
@pytest.mark.parametrize("lead", [(5,), (), (2, 3)])
def test_lora_routed_matches_the_reference(device, assignment, lead):
    p = problem(device, lead=lead, assignment=assignment)
    for bias in (p["b"], None):
        f = lambda fn: lambda x, A, B: fn(x, p["W"], bias, A, B, p["scale"], p["index"])  # noqa: E731
        with ops.use_kernels("off"):
            want = grads(f(ops.lora_routed), p["x"], p["A"], p["B"])
        assert_same(grads(f(ops.lora_routed), p["x"], p["A"], p["B"]), want)


@pytest.mark.parametrize("assignment", sorted(ASSIGNMENTS))
def test_dora_routed_matches_the_reference(device, assignment):
    p = problem(device, assignment=assignment)
    n = norms(p)
    f = lambda x, A, B, m, n: ops.dora_routed(x, p["W"], p["b"], A, B, m, n, p["scale"], p["index"])  # noqa: E731
    with ops.use_kernels("off"):
        want = grads(f, p["x"], p["A"], p["B"], p["m"], n)
    assert_same(grads(f, p["x"], p["A"], p["B"], p["m"], n), want)


def test_stacked_dora_norm_is_each_tasks_norm(device):
    p = problem(device)
    s = p["scale"].view(-1, 1, 1)
    f = lambda A, B: ops.dora_norm(p["W"], s * A, B, 1.0)  # noqa: E731
    with ops.use_kernels("off"):
        torch.testing.assert_close(f(p["A"], p["B"]), norms(p), **TIGHT)  # the reference's stacked form
        want = grads(f, p["A"], p["B"])
    assert_same(grads(f, p["A"], p["B"]), want)
    cached = p["W"].pow(2).sum(1)
    torch.testing.assert_close(ops.dora_norm(p["W"], s * p["A"], p["B"], 1.0, cached), norms(p), **TIGHT)


@pytest.mark.parametrize("act", sorted(ops.ACTIVATIONS))
@pytest.mark.parametrize("assignment", sorted(ASSIGNMENTS))
def test_bottleneck_routed_matches_the_reference(device, act, assignment):
    t = tensors(3, device=device)
    p = problem(device, assignment=assignment)
    x, residual = p["x"], t(*p["x"].shape[:-1], 10)
    args = (t(4, 6, 12), t(4, 6), t(4, 10, 6), t(4, 10))  # down (T, m, d_in), its bias, up (T, d, m), its bias
    f = lambda x, r, *w: ops.bottleneck_routed(x, r, *w, p["scale"], p["index"], act)  # noqa: E731
    with ops.use_kernels("off"):
        want = grads(f, x, residual, *args)
    assert_same(grads(f, x, residual, *args), want)


def test_the_kernel_path_is_taken(device, kernels, monkeypatch):
    p = problem(device)
    calls = []
    monkeypatch.setattr(reference, "lora_routed", lambda *a, **k: calls.append(1))
    ops.lora_routed(p["x"], p["W"], p["b"], p["A"], p["B"], p["scale"], p["index"])
    assert not calls


def test_routed_dropout_drops_by_each_samples_task(device, kernels):
    p = problem(device, n=8, assignment="sorted")
    x = torch.ones(8, 200, 12, device=device)
    torch.manual_seed(0)
    xd = kernels._routed_dropped(x, p["index"], (0.0, 0.5, 0.0, 0.9), True)
    for i, t in enumerate(p["index"].tolist()):
        rate = (xd[i] == 0).float().mean().item()
        assert abs(rate - (0.0, 0.5, 0.0, 0.9)[t]) < 0.06, (i, t, rate)
        kept = xd[i][xd[i] != 0]
        torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - (0.0, 0.5, 0.0, 0.9)[t])))


def opcheck_cases(device):
    p = problem(device, n=4, lead=(3,), d_in=8, d_out=6, r=2, tasks=3, assignment="random")
    g = lambda *ts: [u.clone().requires_grad_(True) for u in ts]  # noqa: E731
    x, A, B, m = g(p["x"], p["A"], p["B"], p["m"])
    n = norms(p)
    t = tensors(4, device=device)
    bottleneck = g(t(4, 3, 6), t(3, 5, 8), t(3, 5), t(3, 6, 5), t(3, 6))
    return [
        ("lora_routed", (x, p["W"], p["b"], A, B, p["scale"], p["index"], None)),
        ("lora_routed", (x, p["W"], None, A, B, p["scale"], p["index"], g(p["x"] * 2)[0])),
        ("dora_routed", (x, p["W"], p["b"], A, B, m, g(n)[0], p["scale"], p["index"], None)),
        ("bottleneck_routed", (x, *bottleneck, p["scale"], p["index"], "gelu")),
        ("dora_norm", (p["W"], A, B, 1.5, None)),  # stacked per task
    ]


@pytest.mark.parametrize("case", range(5))
def test_opcheck(case, device):
    name, args = opcheck_cases(device)[case]
    torch.library.opcheck(getattr(torch.ops.adaptune, name).default, args)


def bad_shape_cases(device):
    """{case: (op, arguments with one wrong shape, the message)}: index (4,), T = 3 tasks"""
    p = problem(device, n=4, lead=(3,), d_in=8, d_out=6, r=2, tasks=3)
    x, W, b, A, B, m, s, i = (p[k] for k in ("x", "W", "b", "A", "B", "m", "scale", "index"))
    t = tensors(4, device=device)
    down, down_bias, up, up_bias = t(3, 5, 8), t(3, 5), t(3, 6, 5), t(3, 6)
    return {
        "lora_routed A": ("lora_routed", (x, W, b, t(3, 2, 7), B, s, i, None), "routed shapes"),
        "lora_routed B tasks": ("lora_routed", (x, W, b, A, t(2, 6, 2), s, i, None), "routed shapes"),
        "lora_routed samples": ("lora_routed", (t(5, 3, 8), W, b, A, B, s, i, None),
                                "x must have the route's 4 samples first"),
        "lora_routed index": ("lora_routed", (x, W, b, A, B, s, i.view(2, 2), None), r"index \(N,\) and scale"),
        "dora_routed magnitude": ("dora_routed", (x, W, b, A, B, t(3, 5), m, s, i, None),
                                  r"magnitude and norm must be \(T, out\) = \(3, 6\)"),
        "bottleneck_routed up": ("bottleneck_routed", (x, t(4, 3, 6), down, down_bias, t(3, 7, 5), up_bias, s, i,
                                                       "gelu"), "routed bottleneck shapes"),
        "bottleneck_routed rows": ("bottleneck_routed", (x, t(4, 2, 6), down, down_bias, up, up_bias, s, i, "gelu"),
                                   "x and residual must have the same rows"),
        "dora_norm stacked": ("dora_norm", (W, A, t(2, 6, 2), 1.5, None), "dora_norm shapes"),
    }


@pytest.mark.parametrize("case", list(bad_shape_cases("cpu")))
def test_a_wrong_shape_fails_alike_in_the_kernel_and_its_fake(case, device):
    test_kernels.assert_fails_alike(*bad_shape_cases(device)[case])


def test_gradcheck_in_float64(device, kernels):
    t = tensors(6, torch.float64, device)
    index = torch.tensor([2, -1, 0, 2, 1], device=device)
    scale = torch.tensor([0.5, 1.5, 2.0], dtype=torch.float64, device=device)
    x, W, b, A, B, m = t(5, 2, 7), t(4, 7), t(4), t(3, 2, 7), t(3, 4, 2), t(3, 4).abs() + 0.5
    n = (t(3, 4).abs() + 1.0)
    leaf = lambda u: u.clone().requires_grad_(True)  # noqa: E731
    assert torch.autograd.gradcheck(lambda x, A, B: kernels.lora_routed(x, W, b, A, B, scale, index),
                                    (leaf(x), leaf(A), leaf(B)))
    assert torch.autograd.gradcheck(lambda x, A, B, m, n: kernels.dora_routed(x, W, b, A, B, m, n, scale, index),
                                    (leaf(x), leaf(A), leaf(B), leaf(m), leaf(n)))
    assert torch.autograd.gradcheck(lambda A, B: kernels.dora_norm(W, A, B, 0.7), (leaf(A), leaf(B)))  # stacked
    for act in ops.ACTIVATIONS:
        args = (leaf(t(5, 2, 7)), leaf(t(5, 2, 4)), leaf(t(3, 3, 7)), leaf(t(3, 3)), leaf(t(3, 4, 3)), leaf(t(3, 4)))
        assert torch.autograd.gradcheck(lambda *a: kernels.bottleneck_routed(*a, scale, index, act), args)
