"""The grouped op of a mixture of experts (ops.grouped_lora: torch's grouped multiply against the reference loop)
and DoRA on every expert (values and gradients against a per-token loop, a fresh DoRA is the base, merge, save /
load, training)."""
import pytest
import torch
from test_experts import ARCHS, bound, build, experts_of, ids, perturb, routing

from adaptune import DoRA, LoRA, attach, detach, load, ops
from adaptune.ops import grouped, reference

pytestmark = pytest.mark.on_device  # on $ADAPTUNE_TEST_DEVICE when set (conftest.py)
TOLERANCE = {torch.float32: dict(atol=1e-4, rtol=1e-5), torch.bfloat16: dict(atol=0.1, rtol=0.02)}


def grouped_inputs(counts=(5, 0, 3, 8), d_in=16, d_out=24, r=4, one=False, seed=0, dtype=torch.float32):
    """Rows sorted by expert (expert 1 has none), weights, factors and row scales with gradients on."""
    g = torch.Generator().manual_seed(seed)
    E = len(counts)

    def rand(*shape, grad=True):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_(grad)

    x = rand(sum(counts), d_in)
    offsets = torch.tensor(counts).cumsum(0)
    weight = rand(E, d_out, d_in, grad=False)
    lead = () if one else (E,)
    A, B = rand(*lead, r, d_in), rand(*lead, d_out, r)
    row_scale = torch.rand(E, d_out, generator=g).add(0.5).requires_grad_()
    return x, offsets, weight, A, B, row_scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("one", [False, True])
@pytest.mark.parametrize("rescale", [False, True])
def test_grouped_multiply_equals_the_reference_loop(one, rescale, dtype, test_device):
    x, offsets, weight, A, B, row_scale = grouped_inputs(one=one, dtype=dtype, r=16 // dtype.itemsize)  # 16-byte rows
    if test_device == "cpu" or dtype == torch.bfloat16:  # torch groups these (CUDA: bfloat16 only)
        assert grouped.supports(x, weight, A, B)
    elif not grouped.supports(x, weight, A, B):
        pytest.skip(f"torch has no grouped multiply for {dtype} on {test_device}")
    scales = row_scale if rescale else None
    inputs = [x, A, B, *([row_scale] if rescale else [])]
    y = grouped.grouped_lora(x, offsets, weight, A, B, 0.5, scales)
    ref = reference.grouped_lora(x, offsets, weight, A, B, 0.5, scales)
    assert y.dtype == ref.dtype == dtype
    torch.testing.assert_close(y, ref, **TOLERANCE[dtype])
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    for a, b in zip(torch.autograd.grad(y, inputs, g), torch.autograd.grad(ref, inputs, g)):
        torch.testing.assert_close(a, b, **TOLERANCE[dtype])
    if not one:  # expert 1 has no rows: no gradient reaches its factors
        dA = torch.autograd.grad(grouped.grouped_lora(x, offsets, weight, A, B, 0.5, scales), A, g)[0]
        assert dA[1].abs().sum() == 0 and dA[0].abs().sum() > 0


def test_the_reference_is_each_experts_rows_through_its_own_math():
    x, offsets, weight, A, B, row_scale = grouped_inputs()
    y = reference.grouped_lora(x, offsets, weight, A, B, 2.0, row_scale)
    start = 0
    for e, stop in enumerate(offsets.tolist()):
        rows = x[start:stop]
        want = row_scale[e] * (rows @ weight[e].T + 2.0 * rows @ A[e].T @ B[e].T)
        torch.testing.assert_close(y[start:stop], want, atol=1e-5, rtol=1e-5)
        start = stop
    torch.testing.assert_close(reference.grouped_lora(x, offsets, weight, None, None, 0.0), torch.cat(
        [x[a:b] @ weight[e].T for e, (a, b) in enumerate(zip([0, *offsets.tolist()], offsets.tolist()))]))


def test_operands_torch_cannot_group_take_the_reference():
    x, offsets, weight, A, B, _ = grouped_inputs(r=3)  # rows of 12 bytes
    assert not grouped.supports(x, weight, A, B)
    assert not grouped.supports(x, weight.double(), A, B)  # mixed dtypes
    assert grouped.supports(x, weight, None, None)
    with ops.use_kernels("off"):  # the mode `off` runs the reference, whatever torch has
        y = ops.grouped_lora(x, offsets, weight, A, B, 1.0)
    torch.testing.assert_close(y, reference.grouped_lora(x, offsets, weight, A, B, 1.0))


# ---- DoRA on every expert ---------------------------------------------------------------------------

def dora_oracle(experts, x, index, weights, mods):
    """Each token through each of its experts one at a time, DoRA written out: W' = W_e + s·B_e·A_e,
    y = (m_e / ‖W'_e rows‖) ⊙ W'·x with the norm detached."""
    rows = []
    for t in range(x.shape[0]):
        y = x.new_zeros(x.shape[1])
        for j in range(index.shape[1]):
            e = int(index[t, j])
            h = x[t]
            for part, weight in (("gate_up", experts.gate_up_proj[e]), ("down", experts.down_proj[e])):
                m = mods[part]
                A, B = m.factors(e)
                w = weight + m.scale * B @ A
                h = (m.magnitude[e] / w.detach().norm(dim=1)) * (w @ h)
                if part == "gate_up":
                    gate, u = h.chunk(2)
                    h = experts.act_fn(gate) * u
            y = y + weights[t, j] * h
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("r, experts", [(4, "each"), (3, "each"), (4, "one")])  # r = 3: the reference loop
def test_dora_values_and_gradients_equal_a_per_expert_loop(name, r, experts):
    model = build(name)
    a = attach(model, {"layers.0.ffn.experts": DoRA(r, alpha=2 * r, experts=experts)})
    perturb(a)
    mods = bound(a)
    assert mods["down"].magnitude.shape == experts_of(model).down_proj.shape[:2]  # (E, out)
    x, index, weights = routing()
    y = experts_of(model)(x, index, weights)
    params = [x, *a.parameters()]
    grads = torch.autograd.grad(y.pow(2).sum(), params)
    ref = dora_oracle(experts_of(model), x, index, weights, mods)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    for g, want in zip(grads, torch.autograd.grad(ref.pow(2).sum(), params)):
        torch.testing.assert_close(g, want, atol=1e-4, rtol=1e-4)
    assert all(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", ARCHS)
def test_a_fresh_expert_dora_is_the_base_and_merges_exactly(name):
    model = build(name)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        base = model(ids()).logits
    a = attach(model, {"ffn.experts": DoRA(4)})
    with torch.no_grad():
        torch.testing.assert_close(model(ids()).logits, base, rtol=0, atol=1e-6)
        perturb(a)
        adapted = model(ids()).logits
        assert (adapted - base).abs().max() > 1e-3
        a.merge()
        torch.testing.assert_close(model(ids()).logits, adapted, atol=1e-5, rtol=1e-5)
        a.unmerge()
        assert torch.equal(model(ids()).logits, adapted)
    detach(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_expert_dora_saves_loads_and_trains_its_magnitudes(tmp_path):
    model = build("qwen3_moe")
    a = attach(model, {"ffn.experts.gate_up": DoRA(4), "ffn.experts.down": DoRA(2, experts="one"),
                       "attn": LoRA(2)})
    perturb(a)
    model.train()
    model(ids()).logits.pow(2).mean().backward()
    magnitudes = {n: p for n, p in a.named_parameters() if n.endswith("magnitude")}
    assert len(magnitudes) == 4 and all(p.grad.abs().sum() > 0 for p in magnitudes.values())
    model.eval()
    with torch.no_grad():
        want = model(ids()).logits
    fresh = build("qwen3_moe")
    loaded = load(fresh, a.save(tmp_path / "dora.safetensors"))
    assert loaded.spec() == a.spec()
    with torch.no_grad():
        assert torch.equal(fresh(ids()).logits, want)


def test_expert_dora_on_a_bfloat16_base_matches_float32_and_keeps_float32_magnitudes():
    """The norms of a half-precision experts weight are computed in float32 an expert at a time: the bf16 model's
    DoRA scales equal those of the same weights in float32."""
    model = build("mixtral")
    a = attach(model, {"layers.0.ffn.experts": DoRA(4, alpha=8)})
    perturb(a)
    module = bound(a)["gate_up"]
    weight = experts_of(model).gate_up_proj
    want = module.row_scale(weight)
    got = module.row_scale(weight.detach().to(torch.bfloat16))
    assert module.magnitude.dtype == got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    assert (got - want).abs().max() > 0  # the bf16 weight was read, not a float32 copy kept elsewhere
