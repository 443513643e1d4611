"""Every op and routed op in float16 and bfloat16, on every device with kernels (test_kernels.py's fixtures):
the kernel, given operands of one half dtype, must be as close to the exact result (float64 on the same rounded
inputs) as the pure-PyTorch reference computing in that dtype is, for the output and every gradient."""
import pytest
import test_kernels
import torch
from test_kernels import tensors

from adaptune import ops
from adaptune.ops import reference

require_kernels, device = test_kernels.require_kernels, test_kernels.device  # fixtures
EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def problem(t, routed: bool) -> dict:
    """Operands for every op, float32; routed ops get T = 3 tasks and a task per sample (-1: none)."""
    lead, d_in, d_out, r, m = (4, 5), 24, 20, 4, 6
    tasks = (3,) if routed else ()
    return dict(x=t(*lead, d_in), W=t(d_out, d_in) / d_in**0.5, b=t(d_out), A=t(*tasks, r, d_in) / d_in**0.5,
                B=t(*tasks, d_out, r) / r**0.5, mag=t(*tasks, d_out).abs() + 0.5, res=t(*lead, d_out),
                Wd=t(*tasks, m, d_in) / 4, bd=t(*tasks, m), Wu=t(*tasks, d_out, m) / 4, bu=t(*tasks, d_out))


INDEX = torch.tensor([0, 2, -1, 1])
SCALE = torch.tensor([0.5, 1.0, 2.0])
# op: (the reference function's name, the differentiated operands, the call)
CASES = {
    "lora": ("lora", "xAB", lambda f, p: f(p["x"], p["W"], p["b"], p["A"], p["B"], 2.0)),
    "dora": ("dora", "xABm", lambda f, p: f(p["x"], p["W"], p["b"], p["A"], p["B"], p["mag"], 2.0)),
    "dora_norm": ("dora_norm", "AB", lambda f, p: f(p["W"], p["A"], p["B"], 2.0)),
    "bottleneck": ("bottleneck", "xRDU", lambda f, p: f(p["x"], p["res"], p["Wd"], p["bd"], p["Wu"], p["bu"], 1.5,
                                                         "gelu")),
    "lora_routed": ("lora_routed", "xAB", lambda f, p: f(p["x"], p["W"], p["b"], p["A"], p["B"], p["scale"],
                                                          p["index"])),
    "dora_routed": ("dora_routed", "xABm", lambda f, p: f(p["x"], p["W"], p["b"], p["A"], p["B"], p["mag"],
                                                           p["norm"], p["scale"], p["index"])),
    "bottleneck_routed": ("bottleneck_routed", "xRDU", lambda f, p: f(p["x"], p["res"], p["Wd"], p["bd"], p["Wu"],
                                                                       p["bu"], p["scale"], p["index"], "gelu")),
}
LEAVES = {"x": "x", "A": "A", "B": "B", "m": "mag", "R": "res", "D": "Wd", "U": "Wu"}


def run(name: str, fn, p: dict) -> list[torch.Tensor]:
    """The output and the gradients of the differentiated operands, for a fixed output gradient."""
    _, leaves, call = CASES[name]
    p = {k: v.detach().clone().requires_grad_(k in {LEAVES[c] for c in leaves}) if torch.is_tensor(v) and
         v.is_floating_point() and k not in ("scale",) else v for k, v in p.items()}
    out = call(fn, p)
    out.backward(torch.linspace(-1, 1, out.numel(), device=out.device).reshape(out.shape).to(out.dtype))
    return [out.detach()] + [p[LEAVES[c]].grad for c in leaves]


def assert_as_close_as_the_reference(name: str, p: dict, dtype: torch.dtype, monkeypatch) -> None:
    exact = run(name, getattr(reference, CASES[name][0]),
                {k: v.double() if v.is_floating_point() and k != "scale" else v for k, v in p.items()})
    in_dtype = run(name, getattr(reference, CASES[name][0]), p)
    with monkeypatch.context() as patch:
        patch.setattr(reference, CASES[name][0], lambda *a, **k: pytest.fail("the reference ran, not the kernel"))
        kernel = run(name, getattr(ops, name), p)
    for i, (k, r, e) in enumerate(zip(kernel, in_dtype, exact)):
        assert k.dtype == r.dtype, (i, k.dtype)  # the operands' dtype (float32 for dora_norm's n, as the reference)
        floor = 4 * EPS[dtype] * max(1.0, e.abs().max().item())
        error, reference_error = (k.double() - e).abs().max().item(), (r.double() - e).abs().max().item()
        assert error <= 2 * reference_error + floor, f"{name} {'output' if i == 0 else f'gradient {i}'}: " \
            f"kernel error {error:.3g}, reference error {reference_error:.3g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_half_kernels_are_as_close_to_exact_as_the_reference(device, dtype, name, monkeypatch):
    p = {k: v.to(dtype) for k, v in problem(tensors(11, device=device), name.endswith("_routed")).items()}
    p.update(index=INDEX.to(device), scale=SCALE.to(device))
    if name != "dora_routed":
        return assert_as_close_as_the_reference(name, p, dtype, monkeypatch)
    # each task's row norms: in float32 as ops.dora_norm gives them to the components, and in the operands' dtype
    norm = torch.stack([reference.dora_norm(p["W"].float(), p["A"][t].float(), p["B"][t].float(), float(SCALE[t]))
                        for t in range(3)])
    for norm_dtype in (torch.float32, dtype):
        assert_as_close_as_the_reference(name, {**p, "norm": norm.to(norm_dtype)}, dtype, monkeypatch)
