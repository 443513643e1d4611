"""Selectors pick the right modules, layers and slices on GPT-2 (fused c_attn) and BERT."""
import pytest
import torch

from adaptune import Adapter, LoRA, attach
from adaptune.points import PROJECTION, SUBLAYER
from adaptune.sites import SITES, SiteMap
from helpers import randomize, tiny_bert, tiny_gpt2

GPT2 = {"q": "attn.c_attn", "k": "attn.c_attn", "v": "attn.c_attn", "o": "attn.c_proj",
        "up": "mlp.c_fc", "down": "mlp.c_proj"}
BERT = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
        "o": "attention.output.dense", "up": "intermediate.dense", "down": "output.dense"}


def layer_path(model, i, name):
    if model.config.model_type == "gpt2":
        return f"transformer.h.{i}.{GPT2[name]}"
    return f"encoder.layer.{i}.{BERT[name]}"


def projections(model, selector):
    """(layer, module path, rows) of each projection point, in order."""
    names = {id(m): n for n, m in model.named_modules()}
    points = SiteMap(model).resolve(selector, PROJECTION, "LoRA")
    return [(p.layer, names[id(p.module)], p.rows) for p in points]


def test_sites_are_the_documented_names():
    assert set(SITES) == {"embed", "attn", "attn.q", "attn.k", "attn.v", "attn.o", "ffn", "ffn.up", "ffn.down", "ffn.gate",
                          "ffn.experts", "ffn.experts.gate_up", "ffn.experts.down", "cross_attn", "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o"}


@pytest.mark.parametrize("selector, layers, names", [
    ("attn", [0, 1], ["q", "k", "v"]),
    ("attn.q", [0, 1], ["q"]),
    ("attn.o", [0, 1], ["o"]),
    ("ffn", [0, 1], ["up", "down"]),
    ("layers.1.ffn", [1], ["up", "down"]),
    ("layers.0-1.attn.v", [0, 1], ["v"]),
    ("layers.0,1.attn", [0, 1], ["q", "k", "v"]),
    ("layers.*.ffn.down", [0, 1], ["down"]),
])
def test_projection_selectors_pick_the_right_modules(model, selector, layers, names):
    got = [(layer, path) for layer, path, _ in projections(model, selector)]
    assert got == [(i, layer_path(model, i, n)) for i in layers for n in names]


def test_layer_subsets_on_a_deeper_model():
    model = tiny_gpt2(n_layer=4)
    assert [layer for layer, _, _ in projections(model, "layers.1-2.attn.q")] == [1, 2]
    assert [layer for layer, _, _ in projections(model, "layers.0,3.attn.q")] == [0, 3]
    assert [layer for layer, _, _ in projections(model, "layers.3,0,0-1.attn.q")] == [0, 1, 3]


def test_gpt2_q_k_v_are_the_thirds_of_c_attn():
    rows = {name: projections(tiny_gpt2(), f"layers.0.attn.{name}")[0][2] for name in "qkv"}
    assert rows == {"q": (0, 32), "k": (32, 64), "v": (64, 96)}
    point = SiteMap(tiny_gpt2()).resolve("layers.0.attn.k", PROJECTION, "LoRA")[0]
    assert (point.dim_in, point.dim_out) == (32, 32)


def test_bert_projections_are_whole_linears():
    assert all(rows is None for _, _, rows in projections(tiny_bert(), "attn"))
    up, down = SiteMap(tiny_bert()).resolve("layers.0.ffn", PROJECTION, "LoRA")
    assert (up.dim_in, up.dim_out, down.dim_in, down.dim_out) == (32, 64, 64, 32)


@pytest.mark.parametrize("name, part", [("q", 0), ("k", 1), ("v", 2)])
def test_lora_on_a_gpt2_projection_changes_only_its_third_of_c_attn(name, part):
    model = tiny_gpt2()
    c_attn = model.transformer.h[1].attn.c_attn
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    base = x @ c_attn.weight + c_attn.bias  # Conv1D: weight is (in, out)
    adaptation = attach(model, {f"layers.1.attn.{name}": LoRA(4, alpha=8)})
    randomize(adaptation)
    (lora,) = [b for b in adaptation.modules() if hasattr(b, "A")]
    expected = base.clone()
    expected[..., 32 * part:32 * (part + 1)] += 2.0 * (x @ lora.A.T) @ lora.B.T
    got = c_attn(x)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, base)
    assert torch.equal(model.transformer.h[0].attn.c_attn(x), x @ model.transformer.h[0].attn.c_attn.weight
                       + model.transformer.h[0].attn.c_attn.bias)  # layer 0 untouched


def test_sublayer_points_span_the_sublayer(model):
    for site, (first, last) in {"attn": ("q", "o"), "ffn": ("up", "down")}.items():
        names = {id(m): n for n, m in model.named_modules()}
        points = SiteMap(model).resolve(f"layers.1.{site}", SUBLAYER, "Adapter")
        assert [(p.layer, names[id(p.in_module)], names[id(p.module)]) for p in points] == \
            [(1, layer_path(model, 1, first), layer_path(model, 1, last))]
        assert (points[0].dim_in, points[0].dim_out) == (32, 32)


def test_raw_module_paths_select_that_module(model):
    path = layer_path(model, 0, "up")
    (point,) = SiteMap(model).resolve(path, PROJECTION, "LoRA")
    assert point.module is model.get_submodule(path) and point.rows is None
    assert (point.dim_in, point.dim_out) == (32, 64 if model.config.model_type == "bert" else 128)
    (sub,) = SiteMap(model).resolve(path, SUBLAYER, "Adapter")
    assert sub.in_module is sub.module is model.get_submodule(path)


def adapted(model):
    """Paths of modules whose forward is routed through adaptune (replaced forward or hooks)."""
    return sorted(n for n, m in model.named_modules()
                  if "adaptune" not in n and n and ("forward" in m.__dict__ or m._forward_hooks))


def test_attach_hooks_only_the_selected_modules(model):
    attach(model, {"layers.1.attn.v": LoRA(2), "layers.0.ffn": Adapter(4),
                   layer_path(model, 0, "o"): LoRA(2)})
    expected = {layer_path(model, 1, "v"), layer_path(model, 0, "down"), layer_path(model, 0, "o")}
    assert adapted(model) == sorted(expected)
