"""Every compiled op against the pure-PyTorch reference, on every device with kernels: the CPU
extension always, and the CUDA kernels too where a GPU is present (the `device` fixture).

The `require` fixture makes a missing or broken build fail these tests instead of falling back.
Dropout: the RNG stays in Python (the wrappers draw drop(x) with F.dropout, as the reference does),
so with the same seed kernel and reference use the same mask.
"""
import importlib

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

from adaptune import ops
from adaptune.ops import reference

settings.register_profile("adaptune-kernels", max_examples=15, deadline=None, derandomize=True)
kernel_settings = settings(settings.get_profile("adaptune-kernels"))
TIGHT = dict(rtol=1e-4, atol=1e-4)  # float32, sums in a different order
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module", autouse=True)
def require_kernels():
    with ops.use_kernels("require"):
        yield


@pytest.fixture(scope="module", params=DEVICES)
def device(request, require_kernels):
    """The device a test runs its kernels on: "cpu", and "cuda" where a GPU is present."""
    assert ops.path("lora", request.param)[0] == "kernel"
    return request.param


@pytest.fixture(scope="module")
def kernels(require_kernels):
    """adaptune.ops.kernels, imported once the library is loaded (its registrations need the schemas)."""
    assert ops.path("lora", "cpu")[0] == "kernel"
    return importlib.import_module("adaptune.ops.kernels")


def tensors(seed, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same values on every device
    return lambda *shape: torch.randn(*shape, generator=g, dtype=dtype).to(device)


def on(device, p):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in p.items()}


@st.composite
def problems(draw, max_rank=256):
    """x (..., in), W (out, in), b, A (r, in), B (out, r), m; ranks 1..256, odd sizes."""
    r = draw(st.integers(1, max_rank))
    d_in, d_out = draw(st.integers(r, r + 40)), draw(st.integers(r, r + 40))
    lead = draw(st.sampled_from([(1,), (3,), (2, 5), (1, 1, 7)]))
    t = tensors(draw(st.integers(0, 2**31 - 1)))
    return dict(x=t(*lead, d_in), W=t(d_out, d_in) / d_in**0.5, b=t(d_out), A=t(r, d_in) / d_in**0.5,
                B=t(d_out, r) / r**0.5, m=t(d_out).abs() + 0.5, s=draw(st.floats(0.25, 4.0)),
                bias=draw(st.booleans()))


def well_conditioned(p) -> None:
    """Skip draws whose DoRA row norms ‖W + s·B·A‖ nearly cancel (< 0.2·‖W‖): there float32 keeps too few
    digits of the norm for any two summation orders to agree to 1e-4."""
    W, A, B = (p[k].double() for k in ("W", "A", "B"))
    assume(bool(((W + p["s"] * B @ A).norm(dim=1) >= 0.2 * W.norm(dim=1)).all()))


def grads(fn, *leaves):
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    out = fn(*leaves)
    out.backward(torch.linspace(-1, 1, out.numel(), device=out.device).reshape(out.shape))
    return [out.detach()] + [t.grad for t in leaves]


@kernel_settings
@given(p=problems())
def test_lora_matches_reference_forward_and_backward(device, p):
    p = on(device, p)
    b = p["b"] if p["bias"] else None
    got = grads(lambda x, A, B: ops.lora(x, p["W"], b, A, B, p["s"]), p["x"], p["A"], p["B"])
    want = grads(lambda x, A, B: reference.lora(x, p["W"], b, A, B, p["s"]), p["x"], p["A"], p["B"])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TIGHT)


@kernel_settings
@given(p=problems())
def test_dora_norm_matches_reference_with_and_without_cache(device, p):
    well_conditioned(p)
    p = on(device, p)
    W, A, B, s = p["W"], p["A"], p["B"], p["s"]
    for cached in (None, W.pow(2).sum(1)):
        torch.testing.assert_close(ops.dora_norm(W, A, B, s, cached), reference.dora_norm(W, A, B, s, cached), **TIGHT)


@kernel_settings
@given(p=problems(), detach_norm=st.booleans())
def test_dora_matches_reference_forward_and_backward(device, p, detach_norm):
    well_conditioned(p)
    p = on(device, p)
    b, W, s = (p["b"] if p["bias"] else None), p["W"], p["s"]
    cached = W.pow(2).sum(1)
    run = lambda fn: grads(lambda x, A, B, m: fn(x, W, b, A, B, m, s, 0.0, False, cached, detach_norm),  # noqa: E731
                           p["x"], p["A"], p["B"], p["m"])
    for g, w in zip(run(ops.dora), run(reference.dora)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


@kernel_settings
@given(p=problems(max_rank=64), act=st.sampled_from(sorted(ops.ACTIVATIONS)), parallel=st.booleans())
def test_bottleneck_matches_reference_serial_and_parallel(device, p, act, parallel):
    p = on(device, p)
    x = p["x"]
    d, m = p["W"].shape  # model width d, bottleneck width m
    t = tensors(7, device=device)
    h = t(*x.shape[:-1], d)  # sublayer output = residual
    bd, bu = (t(m), t(d)) if p["bias"] else (None, None)
    Wd, Wu = t(m, x.shape[-1] if parallel else d) / 4, t(d, m) / 4
    if parallel:  # y = h + s·up(act(down(x)))
        run = lambda f: grads(lambda x_, h_, wd, wu: f(x_, h_, wd, bd, wu, bu, p["s"], act), x, h, Wd, Wu)  # noqa: E731
    else:  # y = h + s·up(act(down(h)))
        run = lambda f: grads(lambda h_, wd, wu: f(h_, h_, wd, bd, wu, bu, p["s"], act), h, Wd, Wu)  # noqa: E731
    for g, w in zip(run(ops.bottleneck), run(reference.bottleneck)):
        torch.testing.assert_close(g, w, **TIGHT)


def test_non_contiguous_inputs_and_transposed_weights(device):
    t = tensors(3, device=device)
    x = t(9, 4, 23).transpose(0, 1)  # (4, 9, 23), non-contiguous
    W = t(23, 17).t()  # (17, 23) transposed, as GPT-2's Conv1D gives it
    A, B, b, m = t(5, 23)[:, :], t(17, 10)[:, ::2], t(34)[::2], t(17).abs() + 0.5
    assert not (x.is_contiguous() or W.is_contiguous() or B.is_contiguous() or b.is_contiguous())
    torch.testing.assert_close(ops.lora(x, W, b, A, B, 1.5), reference.lora(x, W, b, A, B, 1.5), **TIGHT)
    torch.testing.assert_close(ops.dora(x, W, b, A, B, m, 1.5), reference.dora(x, W, b, A, B, m, 1.5), **TIGHT)
    Wd, Wu, bu = t(6, 23), t(23, 12)[:, ::2], t(23)
    torch.testing.assert_close(ops.bottleneck(x, x, Wd, b[:6], Wu, bu, 0.5, "gelu"),
                               reference.bottleneck(x, x, Wd, b[:6], Wu, bu, 0.5, "gelu"), **TIGHT)


@pytest.mark.parametrize("op", ["lora", "dora"])
def test_dropout_uses_the_same_mask_as_the_reference(op, device):
    t = tensors(4, device=device)
    x, W, b, A, B, m = t(3, 5, 16), t(12, 16), t(12), t(4, 16), t(12, 4), t(12).abs() + 0.5
    args = (x, W, b, A, B) + ((m,) if op == "dora" else ()) + (2.0, 0.5, True)
    results = []
    for fn in (getattr(ops, op), getattr(reference, op)):
        torch.manual_seed(11)
        got = grads(lambda x_, A_, B_: fn(x_, W, b, A_, B_, *args[5:]), x, A, B)
        results.append(got)
    for g, w in zip(*results):
        torch.testing.assert_close(g, w, **TIGHT)
    torch.manual_seed(11)
    assert not torch.allclose(getattr(ops, op)(*args), getattr(ops, op)(*args[:-2], 0.0, False))  # dropout was on


def opcheck_cases(device):
    t = tensors(5, device=device)
    x, W, b, A, B, m = t(2, 3, 8), t(6, 8), t(6), t(3, 8), t(6, 3), t(6).abs() + 0.5
    n = reference.dora_norm(W, A, B, 1.5)
    g = lambda *ts: [u.clone().requires_grad_(True) for u in ts]  # noqa: E731
    xg, Ag, Bg, mg, ng = g(x, A, B, m, n)
    return [
        ("lora", (xg, W, b, Ag, Bg, 1.5, None)),
        ("lora", (xg, W, None, Ag, Bg, 0.5, g(x * 2)[0])),
        ("dora_norm", (W, Ag, Bg, 1.5, W.pow(2).sum(1))),
        ("dora_norm", (W, Ag, Bg, 2.0, None)),
        ("dora", (xg, W, b, Ag, Bg, mg, n, 1.5, None)),
        ("dora", (xg, W, None, Ag, Bg, mg, ng, 1.5, g(x * 2)[0])),
        ("bottleneck", (xg, g(t(2, 3, 8))[0], g(t(4, 8))[0], g(t(4))[0], g(t(8, 4))[0], g(t(8))[0], 0.5, "silu")),
        ("bottleneck", (xg, xg, g(t(4, 8))[0], None, g(t(8, 4))[0], None, 1.0, "relu")),
    ]


@pytest.mark.parametrize("case", range(8))
def test_opcheck(case, device):
    name, args = opcheck_cases(device)[case]
    torch.library.opcheck(getattr(torch.ops.adaptune, name).default, args)


def assert_fails_alike(name, args, message):
    """The kernel's TORCH_CHECK and the op's fake (under FakeTensorMode, as torch.compile runs it, and on meta
    tensors) raise the same message for a wrong shape."""
    op = getattr(torch.ops.adaptune, name)
    with pytest.raises(RuntimeError, match=message) as kernel:
        op(*args)
    with FakeTensorMode() as mode, pytest.raises(RuntimeError, match=message) as fake:
        op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    with pytest.raises(RuntimeError, match=message) as meta:
        op(*[a.to("meta") if isinstance(a, torch.Tensor) else a for a in args])
    first_lines = {str(raised.value).splitlines()[0] for raised in (kernel, fake, meta)}
    assert len(first_lines) == 1, first_lines


def bad_shape_cases(device):
    """{case: (op, arguments with one wrong shape, the message)}"""
    t = tensors(5, device=device)
    x, W, b, A, B, m = t(2, 3, 8), t(6, 8), t(6), t(3, 8), t(6, 3), t(6).abs() + 0.5
    return {
        "lora A": ("lora", (x, W, b, t(3, 7), B, 1.5, None), "shape mismatch: x"),
        "lora bias": ("lora", (x, W, t(5), A, B, 1.5, None), r"bias must be \(6,\)"),
        "lora xd": ("lora", (x, W, b, A, B, 1.5, t(2, 4, 8)), "xd must have x's shape"),
        "dora_norm B": ("dora_norm", (W, A, t(5, 3), 1.5, None), "dora_norm shapes"),
        "dora_norm weight_norm_sq": ("dora_norm", (W, A, B, 1.5, t(5)), r"weight_norm_sq must be \(6,\)"),
        "dora magnitude": ("dora", (x, W, b, A, B, t(5), m, 1.5, None), r"magnitude and norm must be \(6,\)"),
        "dora x": ("dora", (t(2, 3, 7), W, b, A, B, m, m, 1.5, None), "shape mismatch: x"),
        "bottleneck up": ("bottleneck", (x, x, t(4, 8), None, t(7, 4), None, 1.0, "relu"), "bottleneck shapes"),
        "bottleneck rows": ("bottleneck", (x, t(2, 4, 8), t(4, 8), None, t(8, 4), None, 1.0, "relu"),
                            "bottleneck shapes"),
    }


@pytest.mark.parametrize("case", list(bad_shape_cases("cpu")))
def test_a_wrong_shape_fails_alike_in_the_kernel_and_its_fake(case, device):
    assert_fails_alike(*bad_shape_cases(device)[case])


def test_a_wrong_shape_under_torch_compile_fails_with_the_kernels_message(device, kernels):
    torch._dynamo.reset()
    t = tensors(5, device=device)
    x, W, A, B = t(2, 8), t(6, 8), t(3, 7), t(6, 3)
    compiled = torch.compile(lambda x, A: kernels.lora(x, W, None, A, B, 1.0), fullgraph=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match=r"adaptune: shape mismatch: x \[2, 8\], weight \[6, 8\], A \[3, 7\]"):
        compiled(x, A)


def test_gradcheck_in_float64(device, kernels):
    t = tensors(6, torch.float64, device)
    x, W, b, A, B, m = t(2, 3, 7), t(5, 7), t(5), t(3, 7), t(5, 3), t(5).abs() + 0.5
    leaf = lambda u: u.clone().requires_grad_(True)  # noqa: E731
    assert torch.autograd.gradcheck(lambda x, A, B: kernels.lora(x, W, b, A, B, 1.5), (leaf(x), leaf(A), leaf(B)))
    assert torch.autograd.gradcheck(lambda x, A, B, m: kernels.dora(x, W, b, A, B, m, 1.5, detach_norm=False),
                                    (leaf(x), leaf(A), leaf(B), leaf(m)))
    # a detached norm is a constant only with respect to x and m (A and B are compared with the reference)
    assert torch.autograd.gradcheck(lambda x, m: kernels.dora(x, W, b, A, B, m, 1.5), (leaf(x), leaf(m)))
    assert torch.autograd.gradcheck(lambda A, B: kernels.dora_norm(W, A, B, 0.7), (leaf(A), leaf(B)))
    for act in ops.ACTIVATIONS:
        args = (leaf(t(2, 3, 5)), leaf(t(2, 3, 5)), leaf(t(4, 5)), leaf(t(4)), leaf(t(5, 4)), leaf(t(5)))
        assert torch.autograd.gradcheck(lambda *a: kernels.bottleneck(*a, 0.5, act), args)


class Tiny(torch.nn.Module):
    """LoRA q, DoRA v, and a serial adapter: every op in one small module."""

    def __init__(self, d=16, r=4):
        super().__init__()
        t = tensors(8)
        self.register_buffer("W", t(d, d))
        self.A, self.B = torch.nn.Parameter(t(r, d)), torch.nn.Parameter(t(d, r))
        self.m = torch.nn.Parameter(t(d).abs() + 0.5)
        self.down, self.up = torch.nn.Parameter(t(8, d)), torch.nn.Parameter(t(d, 8))

    def forward(self, x):
        q = ops.lora(x, self.W, None, self.A, self.B, 2.0)
        v = ops.dora(q, self.W, None, self.A, self.B, self.m, 2.0, detach_norm=False)
        return ops.bottleneck(v, v, self.down, None, self.up, None, 1.0, "gelu")


def test_torch_compile_fullgraph_matches_eager(device):
    torch._dynamo.reset()
    model, x = Tiny().to(device), tensors(9, device=device)(2, 5, 16)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    eager_out, compiled_out = model(x), compiled(x)
    torch.testing.assert_close(compiled_out, eager_out, **TIGHT)
    eager = torch.autograd.grad(eager_out.sum(), list(model.parameters()))
    got = torch.autograd.grad(compiled(x).sum(), list(model.parameters()))
    for g, w in zip(got, eager):
        torch.testing.assert_close(g, w, **TIGHT)


@pytest.mark.parametrize("op", ["lora", "dora", "bottleneck"])
def test_autocast_runs_the_reference(op, device, monkeypatch):
    monkeypatch.setattr(ops, "_warned", set())
    t = tensors(12, device=device)
    x, W, b, A, B, m = t(3, 8), t(6, 8), t(6), t(2, 8), t(6, 2), t(6).abs() + 0.5
    Wd, bd, Wu, bu = t(4, 8), t(4), t(8, 4), t(8)
    call = {"lora": lambda f: f.lora(x, W, b, A, B, 1.5),
            "dora": lambda f: f.dora(x, W, b, A, B, m, 1.5),
            "bottleneck": lambda f: f.bottleneck(x, x, Wd, bd, Wu, bu, 0.5, "gelu")}[op]
    with torch.autocast(device, dtype=torch.bfloat16):
        want = call(reference)
        with pytest.warns(RuntimeWarning, match="under torch.autocast runs the reference"):
            got = call(ops)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)
