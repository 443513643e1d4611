"""Bottleneck adapters: identity at init, serial and parallel math, stacking order, counts."""
import pytest
import torch
import torch.nn.functional as F

from adaptune import Adapter, attach
from helpers import assert_grads_on_components_only, bound, main_output, out, randomize, tiny_bert, tiny_gpt2


def bottleneck(adapter, src, act=F.relu):
    return adapter.scale * F.linear(act(F.linear(src, adapter.down_weight, adapter.down_bias)),
                                    adapter.up_weight, adapter.up_bias)


@pytest.mark.parametrize("placement", ["serial", "parallel"])
def test_fresh_adapter_leaves_outputs_unchanged(model, ids, placement):
    before = out(model, ids)
    attach(model, {"attn": Adapter(8, placement=placement), "ffn": Adapter(8, placement=placement)})
    assert torch.equal(out(model, ids), before)  # up starts at zero: exactly the identity


@pytest.mark.parametrize("placement", ["serial", "parallel"])
def test_randomised_adapter_changes_outputs(model, ids, placement):
    before = out(model, ids)
    randomize(attach(model, {"ffn": Adapter(8, placement=placement)}))
    assert (out(model, ids) - before).abs().max() > 1e-3


def test_serial_adapter_rewrites_the_sublayer_output():
    model = tiny_bert()
    dense = model.encoder.layer[0].output.dense  # the ffn's output projection, before residual and norm
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
    h = dense(x)
    adaptation = attach(model, {"layers.0.ffn": Adapter(8, act="tanh", scale=0.5)})
    randomize(adaptation)
    (adapter,) = bound(adaptation, "ffn", 0)
    torch.testing.assert_close(dense(x), h + bottleneck(adapter, h, torch.tanh))


def test_parallel_adapter_reads_the_sublayer_input():
    model = tiny_gpt2()
    mlp = model.transformer.h[1].mlp
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    base = mlp(x)
    adaptation = attach(model, {"layers.1.ffn": Adapter(8, placement="parallel")})
    randomize(adaptation)
    (adapter,) = bound(adaptation, "ffn", 1)
    torch.testing.assert_close(mlp(x), base + bottleneck(adapter, x))


def test_parallel_adapter_on_a_raw_linear_maps_its_input_to_its_output_width():
    model = tiny_bert()
    path = "encoder.layer.1.intermediate.dense"  # 32 -> 64
    dense = model.get_submodule(path)
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    h = dense(x)
    adaptation = attach(model, {path: Adapter(4, placement="parallel", act="gelu")})
    randomize(adaptation)
    (adapter,) = bound(adaptation, "encoder.layer.1.intermediate.dense")
    assert adapter.down_weight.shape == (4, 32) and adapter.up_weight.shape == (64, 4)
    torch.testing.assert_close(dense(x), h + bottleneck(adapter, x, F.gelu))


def test_stacked_adapters_apply_in_stack_order():
    model = tiny_gpt2()
    c_proj = model.transformer.h[0].attn.c_proj
    x = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(0))
    adaptation = attach(model, {"layers.0.attn": Adapter(8) | Adapter(4, act="silu")})
    randomize(adaptation)
    first, second = bound(adaptation, "attn", 0)
    h = x @ c_proj.weight + c_proj.bias
    h1 = h + bottleneck(first, h)
    torch.testing.assert_close(c_proj(x), h1 + bottleneck(second, h1, F.silu))


def test_gradients_reach_adapter_parameters_only(model, ids):
    originally = {n for n, _ in model.named_parameters()}
    adaptation = attach(model, {"attn": Adapter(8), "ffn": Adapter(8, placement="parallel")})
    randomize(adaptation)
    main_output(model(ids)).pow(2).mean().backward()
    assert_grads_on_components_only(model, originally)


@pytest.mark.parametrize("placement", ["serial", "parallel"])
def test_adapter_adds_2md_plus_d_plus_m_per_site(model, placement):
    m, d, layers = 8, 32, 2
    attach(model, {"attn": Adapter(m, placement=placement), "layers.1.ffn": Adapter(m, placement=placement)})
    per_site = 2 * m * d + d + m
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == (layers + 1) * per_site
