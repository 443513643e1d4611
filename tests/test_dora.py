"""DoRA: identity at init, magnitude/direction math on Linear and on GPT-2's fused slices."""
import pytest
import torch

from adaptune import DoRA, attach
from helpers import assert_grads_on_components_only, bound, main_output, out, randomize, tiny_bert, tiny_gpt2

pytestmark = pytest.mark.on_device  # on $ADAPTUNE_TEST_DEVICE when set (conftest.py)


def dora_formula(x, W, b, dora):
    Wm = W + dora.scale * dora.B @ dora.A  # (out, in), materialised
    return (dora.magnitude / Wm.norm(dim=1)) * (x @ Wm.T) + b


def test_fresh_dora_leaves_outputs_unchanged(model, ids):
    before = out(model, ids)
    attach(model, {"attn": DoRA(4), "ffn": DoRA(2)})
    torch.testing.assert_close(out(model, ids), before, rtol=0, atol=1e-5)


def test_randomised_dora_changes_outputs(model, ids):
    before = out(model, ids)
    adaptation = attach(model, {"attn": DoRA(4)})
    randomize(adaptation)
    assert (out(model, ids) - before).abs().max() > 1e-3


def test_magnitude_starts_at_the_row_norms_of_the_weight_slice():
    model = tiny_gpt2()
    adaptation = attach(model, {"layers.1.attn.v": DoRA(2)})
    (dora,) = bound(adaptation, "attn.v", 1)
    W = model.transformer.h[1].attn.c_attn.weight.T[64:96]  # v rows of the (out, in) weight
    torch.testing.assert_close(dora.magnitude, W.norm(dim=1))


def test_dora_on_a_linear_equals_the_materialised_formula():
    model = tiny_bert()
    key = model.encoder.layer[0].attention.self.key
    adaptation = attach(model, {"layers.0.attn.k": DoRA(4, alpha=8)})
    randomize(adaptation)
    (dora,) = bound(adaptation, "attn.k", 0)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(key(x), dora_formula(x, key.weight, key.bias, dora))


def test_dora_on_gpt2_q_equals_the_formula_on_its_slice_only():
    model = tiny_gpt2()
    c_attn = model.transformer.h[0].attn.c_attn
    adaptation = attach(model, {"layers.0.attn.q": DoRA(4)})
    randomize(adaptation)
    (dora,) = bound(adaptation, "attn.q", 0)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    W, b = c_attn.weight.T, c_attn.bias  # (96, 32), (96,)
    expected = torch.cat([dora_formula(x, W[:32], b[:32], dora), x @ W[32:].T + b[32:]], dim=-1)
    torch.testing.assert_close(c_attn(x), expected)


def test_cached_weight_norm_follows_in_place_changes_of_the_base_weight():
    model = tiny_bert()
    value = model.encoder.layer[1].attention.self.value
    adaptation = attach(model, {"layers.1.attn.v": DoRA(2)})
    randomize(adaptation)
    (dora,) = bound(adaptation, "attn.v", 1)
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    value(x)  # fills the cache
    with torch.no_grad():
        value.weight.mul_(2.0)
    torch.testing.assert_close(value(x), dora_formula(x, value.weight, value.bias, dora))


def test_gradients_reach_magnitude_and_factors_only(model, ids):
    originally = {n for n, _ in model.named_parameters()}
    adaptation = attach(model, {"attn": DoRA(2, detach_norm=False)})
    randomize(adaptation)
    main_output(model(ids)).pow(2).mean().backward()
    assert_grads_on_components_only(model, originally)
    assert {n.rsplit(".", 1)[1] for n, _ in adaptation.named_parameters()} == {"A", "B", "magnitude"}


def test_dora_adds_r_times_in_plus_out_plus_out_per_projection():
    r = 3
    gpt2 = tiny_gpt2(n_layer=2, n_embd=32)
    attach(gpt2, {"attn": DoRA(r), "ffn.up": DoRA(r)})
    d, ff = 32, 128
    expected = 2 * (3 * (r * (d + d) + d) + r * (d + ff) + ff)
    assert sum(p.numel() for p in gpt2.parameters() if p.requires_grad) == expected
    bert = tiny_bert(layers=2, hidden=32)
    attach(bert, {"layers.1.attn.o": DoRA(r)})
    assert sum(p.numel() for p in bert.parameters() if p.requires_grad) == r * (32 + 32) + 32
