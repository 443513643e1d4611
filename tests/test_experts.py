"""LoRA on every expert of a mixture of experts (transformers' fused experts: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE):
sites found by structure, values and gradients against a per-token loop, merge, save / load, counts, refusals."""
import json

import pytest
import torch
import transformers as T

from adaptune import (Adapter, BindError, BitFit, LoRA, Stack, TaskError, Trainable, attach,
                      detach, load)
from adaptune.points import EXPERTS
from adaptune.sites import SiteMap

COMMON = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=64, max_position_embeddings=64)
MOE = {
    "mixtral": lambda: T.MixtralForCausalLM(T.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **COMMON)),
    "qwen2_moe": lambda: T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=40, **COMMON)),
    "qwen3_moe": lambda: T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, head_dim=8, **COMMON)),
    "olmoe": lambda: T.OlmoeForCausalLM(T.OlmoeConfig(num_experts=4, num_experts_per_tok=2, **COMMON)),
}
ARCHS = list(MOE)


def build(name, seed=0):
    torch.manual_seed(seed)
    return MOE[name]().eval()


def gpt_oss():
    torch.manual_seed(0)
    return T.GptOssForCausalLM(T.GptOssConfig(num_local_experts=4, num_experts_per_tok=2, head_dim=8, **COMMON)).eval()


def perturb(adaptation, std=0.1, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adaptation.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def ids(seed=0):
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(seed))


def experts_of(model, layer=0):
    return model.model.layers[layer].mlp.experts


def routing(n_tokens=9, hidden=32, seed=0):
    """Tokens (T, H) routed top-2 among experts 0-2: expert 3 gets none."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tokens, hidden, generator=g, requires_grad=True)
    index = torch.stack([torch.randperm(3, generator=g)[:2] for _ in range(n_tokens)])  # (T, 2)
    weights = torch.rand(n_tokens, 2, generator=g).softmax(-1)
    return x, index, weights


def oracle(experts, x, index, weights, up, down, scale=1.0):
    """Each token through each of its experts, one at a time: W_e + s·B_e·A_e written out; `up` / `down` give
    (A_e, B_e) of an expert (None: no update)."""
    rows = []
    for t in range(x.shape[0]):
        y = x.new_zeros(x.shape[1])
        for j in range(index.shape[1]):
            e = int(index[t, j])
            h = experts.gate_up_proj[e] @ x[t]
            if up is not None:
                A, B = up(e)
                h = h + scale * (B @ (A @ x[t]))
            gate, u = h.chunk(2)
            a = experts.act_fn(gate) * u
            o = experts.down_proj[e] @ a
            if down is not None:
                A, B = down(e)
                o = o + scale * (B @ (A @ a))
            y = y + weights[t, j] * o
        rows.append(y)
    return torch.stack(rows)


def bound(adaptation, layer=0):
    """{part: module} of the expert LoRAs bound at `layer`."""
    return {b.point.part: b.module for b in adaptation.bindings() if b.point.kind == EXPERTS and b.point.layer == layer}


# ---- sites ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ARCHS)
def test_expert_sites_are_found_by_structure(name):
    model = build(name)
    sites = SiteMap(model)
    points = sites.resolve("ffn.experts", "projection", "LoRA")
    assert [(p.layer, p.part) for p in points] == [(0, "gate_up"), (0, "down"), (1, "gate_up"), (1, "down")]
    experts = experts_of(model)
    gate_up, down = points[0], points[1]
    assert gate_up.module is experts and down.module is experts and gate_up.kind == EXPERTS and gate_up.experts == 4
    E, two_i, h = experts.gate_up_proj.shape
    assert (gate_up.dim_in, gate_up.dim_out, down.dim_in, down.dim_out) == (h, two_i, two_i // 2, h)
    (only,) = sites.resolve("layers.1.ffn.experts.down", "projection", "LoRA")
    assert only.part == "down" and only.module is experts_of(model, 1)
    rows = {row[0]: row for row in sites.table()}
    assert rows["ffn.experts"][3] == experts.gate_up_proj.numel() + experts.down_proj.numel()
    assert "ffn" not in rows


@pytest.mark.parametrize("name", ARCHS)
def test_ffn_alone_is_refused_naming_the_experts_site(name):
    model = build(name)
    for site in ("ffn", "ffn.up", "ffn.gate"):
        with pytest.raises(BindError, match=r"mixture of experts.*'ffn\.experts'"):
            attach(model, {site: LoRA(4)})
    with pytest.raises(BindError, match="mixture of experts"):
        attach(model, {"ffn": Adapter(8)})
    assert not hasattr(model, "adaptune")


def test_a_shared_expert_is_named_by_path_and_reachable():
    model = build("qwen2_moe")
    with pytest.raises(BindError, match=r"model\.layers\.\*\.mlp\.shared_expert\.gate_proj"):
        attach(model, {"ffn": LoRA(4)})
    a = attach(model, {"model.layers.*.mlp.shared_expert.up_proj": LoRA(4), "ffn.experts": LoRA(2)})
    assert len(list(a.bindings())) == 2 + 4


def test_experts_sites_on_a_dense_model_are_refused():
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(**COMMON))
    with pytest.raises(BindError, match="not a mixture of experts"):
        attach(model, {"ffn.experts": LoRA(4)})


def test_router_takes_trainable_by_path_and_lora_is_refused_there():
    model = build("mixtral")
    with pytest.raises(BindError, match="not a Linear"):
        attach(model, {"model.layers.0.mlp.gate": LoRA(4)})
    a = attach(model, {"model.layers.*.mlp.gate": Trainable(), "ffn.experts": LoRA(2)})
    model(ids()).logits.float().pow(2).mean().backward()
    routers = [p for n, p in a.named_parameters() if p.requires_grad and "gate" in n and "experts" not in n]
    assert len(routers) == 2 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in routers)


# ---- values and gradients ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ARCHS)
def test_a_fresh_expert_lora_is_the_base(name):
    model = build(name)
    model.set_experts_implementation("grouped_mm")
    base = model(ids()).logits
    model.set_experts_implementation("eager")
    eager = model(ids()).logits
    a = attach(model, {"ffn.experts": LoRA(4, alpha=8)})
    assert len(list(a.bindings())) == 4
    for expected in (base, eager):  # B = 0: the base's function, up to the order of float sums
        assert torch.allclose(model(ids()).logits, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("experts", ["each", "one"])
def test_values_and_gradients_equal_a_per_expert_loop(name, experts):
    model = build(name)
    a = attach(model, {"layers.0.ffn.experts": LoRA(3, alpha=6, experts=experts)})
    perturb(a)
    mods = bound(a)
    x, index, weights = routing()
    y = experts_of(model)(x, index, weights)
    grads = torch.autograd.grad(y.pow(2).sum(), [x, *a.parameters()])
    ref = oracle(experts_of(model), x, index, weights, mods["gate_up"].factors, mods["down"].factors, scale=2.0)
    ref_grads = torch.autograd.grad(ref.pow(2).sum(), [x, *a.parameters()])
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
    if experts == "each":  # expert 3 gets no tokens: no gradient on its factors
        for m in mods.values():
            assert m.A.shape[0] == 4 and m.A.grad is None
        g_A = dict(zip([n for n, _ in a.named_parameters()], grads[1:]))
        assert all(v[3].abs().sum() == 0 and v[:3].abs().sum() > 0 for v in g_A.values())


@pytest.mark.parametrize("part", ["gate_up", "down"])
def test_one_part_alone_equals_the_loop_with_that_update(part):
    model = build("olmoe")
    a = attach(model, {f"layers.0.ffn.experts.{part}": LoRA(2)})
    perturb(a)
    (module,) = bound(a).values()
    x, index, weights = routing(seed=3)
    ups = {"gate_up": (module.factors, None), "down": (None, module.factors)}[part]
    torch.testing.assert_close(experts_of(model)(x, index, weights),
                               oracle(experts_of(model), x, index, weights, *ups), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ARCHS)
def test_the_model_trains_every_expert_factor(name):
    model = build(name)
    a = attach(model, {"ffn.experts": LoRA(4)})
    perturb(a)
    model.train()
    model(torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(5))).logits.pow(2).mean().backward()
    for n, p in a.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("adaptune."))


# ---- merge, save / load, counts --------------------------------------------------------------------

@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("experts", ["each", "one"])
def test_merge_folds_every_expert_and_unmerge_restores_bit_exact(name, experts):
    model = build(name)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    a = attach(model, {"ffn.experts": LoRA(4, alpha=2, experts=experts)})
    perturb(a)
    with torch.no_grad():
        adapted = model(ids()).logits
        a.merge()
        merged = model(ids()).logits
        experts_w = experts_of(model)
        mod = bound(a)["down"]
        A, B = mod.factors(2)
        torch.testing.assert_close(experts_w.down_proj[2], before["model.layers.0.mlp.experts.down_proj"][2]
                                   + 0.5 * B @ A)
        assert a.merged
        a.unmerge()
        assert torch.equal(model(ids()).logits, adapted)
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if not n.startswith("adaptune."))
    detach(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("name", ARCHS)
def test_save_and_load_round_trip(name, tmp_path):
    model = build(name)
    a = attach(model, {"ffn.experts.gate_up": LoRA(4), "ffn.experts.down": LoRA(2, experts="one", alpha=4)})
    perturb(a)
    keys = set(a.state_dict())
    assert "shared.points.layers:0:ffn:experts:gate_up.0.A" in keys and len(keys) == 8
    with torch.no_grad():
        want = model(ids()).logits
    path = a.save(tmp_path / "experts.safetensors")
    fresh = build(name)
    loaded = load(fresh, path)
    assert set(loaded.state_dict()) == keys
    assert loaded.spec() == a.spec()
    with torch.no_grad():
        assert torch.equal(fresh(ids()).logits, want)


@pytest.mark.parametrize("name", ARCHS)
def test_counts_are_every_experts_factors(name):
    model = build(name)
    a = attach(model, {"ffn.experts": LoRA(4), "layers.0.attn.q": LoRA(2)})
    E, two_i, h = experts_of(model).gate_up_proj.shape
    per_layer = E * 4 * (h + two_i) + E * 4 * (two_i // 2 + h)
    q = model.model.layers[0].self_attn.q_proj
    assert a.counts().shared == 2 * per_layer + 2 * (q.in_features + q.out_features)
    one = attach(build(name), {"ffn.experts": LoRA(4, experts="one")})
    assert one.counts().shared == 2 * (4 * (h + two_i) + 4 * (two_i // 2 + h))


def test_the_experts_option_round_trips_and_stays_out_of_plain_lora():
    assert "experts" not in LoRA(4).to_dict() and "experts" not in repr(LoRA(4))
    stack = Stack(LoRA(4, experts="one"))
    back = Stack.from_dict(json.loads(json.dumps(stack.to_dict())))
    assert back == stack and back[0].experts == "one" and "experts='one'" in repr(back)
    with pytest.raises(Exception, match="experts must be one of"):
        LoRA(4, experts="all")


# ---- tasks and routes ----------------------------------------------------------------------------

def test_tasks_switch_expert_loras_and_a_mixed_route_is_refused():
    model = build("mixtral")
    with torch.no_grad():
        base = model(ids()).logits
    a = attach(model, {}, tasks={"a": {"ffn.experts": LoRA(4)}, "b": {"ffn.experts": LoRA(2)}})
    perturb(a)
    with torch.no_grad():
        ya = model(ids()).logits if a.use("a") else None
        yb = model(ids()).logits if a.use("b") else None
        assert not torch.allclose(ya, yb)
        with a.route(["a", "a"]):
            assert torch.equal(model(ids()).logits, ya)
        with pytest.raises(TaskError, match="mixes tasks.*mixture of experts"):
            with a.route(["a", "b"]):
                model(ids())
        a.use(None)
        torch.testing.assert_close(model(ids()).logits, base, atol=1e-5, rtol=1e-5)


def test_a_mixed_route_runs_shared_expert_lora():
    model = build("qwen3_moe")
    a = attach(model, {"ffn.experts": LoRA(4)}, tasks={"a": {"attn": LoRA(2)}, "b": {"attn": LoRA(2)}})
    perturb(a)
    with torch.no_grad():
        both = ids()
        with a.route(["a", "b"]):
            y = model(both).logits
        a.use("a")
        torch.testing.assert_close(y[:1], model(both[:1]).logits, atol=1e-5, rtol=1e-5)


# ---- refusals ------------------------------------------------------------------------------------

def test_gpt_oss_experts_are_refused_naming_the_layout():
    model = gpt_oss()
    with pytest.raises(BindError, match="GptOssExperts.*layout.*is_transposed=True"):
        attach(model, {"ffn.experts": LoRA(4)})
    with pytest.raises(BindError, match="mixture of experts.*GptOssExperts"):
        attach(model, {"ffn": LoRA(4)})
    attach(model, {"attn": LoRA(4)})


@pytest.mark.parametrize("component, match", [
    (LoRA(4, init="pissa"), "init='pissa' is not supported on a mixture of experts"),
    (LoRA(64), "r=64 is larger"),
    (BitFit(), "take LoRA or DoRA only"),
    (Adapter(8), "mixture of experts' weights take LoRA or DoRA"),
])
def test_other_components_on_experts_are_refused(component, match):
    model = build("mixtral")
    with pytest.raises(BindError, match=match):
        attach(model, {"ffn.experts": component})
    assert not hasattr(model, "adaptune")


def test_two_expert_loras_on_one_weight_are_refused():
    with pytest.raises(BindError, match="two low-rank updates"):
        attach(build("mixtral"), {"ffn.experts": LoRA(4), "ffn.experts.down": LoRA(2)})


def test_a_model_mixing_dense_and_sparse_layers_names_its_sparse_ones():
    torch.manual_seed(0)
    model = T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                                                   shared_expert_intermediate_size=40, mlp_only_layers=[0],
                                                   **COMMON)).eval()
    with pytest.raises(BindError, match=r"layer 0: that layer's feed-forward is dense.*layers are 1"):
        attach(model, {"ffn.experts": LoRA(4)})
    a = attach(model, {"layers.1.ffn.experts": LoRA(4)})
    assert {b.point.layer for b in a.bindings()} == {1}


def test_merged_float_refuses_expert_lora():
    from adaptune import MergeError, merged_float
    model = build("mixtral")
    attach(model, {"ffn.experts": LoRA(4)})
    with pytest.raises(MergeError, match="ExpertsLoRAModule cannot be folded"):
        merged_float(model)


def test_combine_refuses_expert_lora_clearly():
    from adaptune import ConfigError, combine
    model = build("mixtral")
    adaptation = attach(model, tasks={"a": {"ffn.experts": LoRA(2)}, "b": {"ffn.experts": LoRA(2)}})
    with pytest.raises(ConfigError, match="combine\\(\\) does not combine expert LoRA yet"):
        combine(adaptation, {"a": 0.5, "b": 0.5}, into="soup")
    assert adaptation.task_names == ["a", "b"]
