"""LoRA on a mixture of experts in Hugging Face PEFT's format (target_parameters, PEFT's ParamWrapper), both ways:
the logits of PeftModel.from_pretrained equal adaptune's, PEFT's adapters import with PEFT's logits, the tensor
layout and key nesting are PEFT's, and what PEFT cannot express (or adaptune cannot represent) is refused."""
import json

import peft
import pytest
import torch
from safetensors.torch import load_file

from test_experts import MOE as ALL
from test_experts import build as build_moe
from test_experts import gpt_oss, ids

from adaptune import AdaptuneError, DoRA, LoadError, LoRA, attach
from adaptune.peft_export import CONFIG_NAME, WEIGHTS_NAME, export_peft
from adaptune.peft_import import import_peft
from adaptune.points import EXPERTS

ATOL = 1e-5
MOE = {name: ALL[name] for name in ("mixtral", "qwen3_moe", "olmoe")}  # the shapes tests/test_experts.py builds
BOTH = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def build(name="mixtral"):
    return gpt_oss() if name == "gpt_oss" else build_moe(name)


@torch.no_grad()
def logits(model):
    return model(ids()).logits


@torch.no_grad()
def randomize(parameters, std=0.2, seed=1):
    g = torch.Generator().manual_seed(seed)
    for p in parameters:
        p.copy_(std * torch.randn(p.shape, generator=g))


def peft_adapter(name, directory, **kw):
    """A PEFT LoRA on `name` with random factors, saved to `directory`; returns its logits."""
    model = peft.get_peft_model(build(name), peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": [],
                                                                "target_parameters": BOTH, **kw})).eval()
    randomize([p for n, p in model.named_parameters() if "lora_" in n], seed=2)
    model.save_pretrained(str(directory))
    return logits(model)


def experts_specs(adaptation):
    return {sel: stack[0] for sel, stack in adaptation.specs[None].items() if ".ffn.experts." in sel}


def edit_config(directory, **changes):
    path = directory / CONFIG_NAME
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# ---- adaptune -> PEFT -> adaptune ----------------------------------------------------------------

@pytest.mark.parametrize("name", list(MOE))
@pytest.mark.parametrize("experts", ["each", "one"])
def test_export_loads_in_peft_with_equal_logits_and_reimports(name, experts, tmp_path):
    model = build(name)
    base = logits(model)
    a = attach(model, {"ffn.experts": LoRA(4, alpha=8, experts=experts)})
    randomize(a.parameters())
    expected = logits(model)
    assert (expected - base).abs().max() > 1e-2
    export_peft(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["target_modules"] == [] and (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0)
    assert config["target_parameters"] == [f"model.layers.{i}.mlp.experts.{p}_proj" for i in (0, 1)
                                           for p in ("down", "gate_up")]
    torch.testing.assert_close(logits(peft.PeftModel.from_pretrained(build(name), str(tmp_path)).eval()), expected,
                               atol=ATOL, rtol=0)
    fresh = build(name)
    back = import_peft(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh), expected, atol=ATOL, rtol=0)
    assert experts_specs(back) == {f"layers.{i}.ffn.experts.{p}": LoRA(4, alpha=8) for i in (0, 1)
                                   for p in ("gate_up", "down")}  # experts="one" comes back with a copy per expert


def test_the_layout_is_peft_expert_major_a_and_expert_minor_b(tmp_path):
    model = build()
    a = attach(model, {"layers.0.ffn.experts": LoRA(2, alpha=6), "layers.1.ffn.experts.down": LoRA(3)})
    randomize(a.parameters())
    export_peft(a, tmp_path)
    t = load_file(str(tmp_path / WEIGHTS_NAME))
    key = "base_model.model.model.layers.{}.mlp.experts.{}lora_{}.weight"
    assert set(t) == {key.format(0, "base_layer.", "A"), key.format(0, "base_layer.", "B"), key.format(0, "", "A"),
                      key.format(0, "", "B"), key.format(1, "", "A"), key.format(1, "", "B")}
    mods = {(b.point.layer, b.point.part): b.module for b in a.bindings(kind=EXPERTS)}
    E, r = 4, 2
    for part, nested, (d_in, d_out) in (("gate_up", "base_layer.", (32, 96)), ("down", "", (48, 32))):
        A, B = t[key.format(0, nested, "A")], t[key.format(0, nested, "B")]  # PEFT nests gate_up_proj inside
        assert A.shape == (E * r, d_in) and B.shape == (d_out, r * E)
        m = mods[(0, part)]
        for e in range(E):
            torch.testing.assert_close(A[e * r:(e + 1) * r], m.A[e].detach())  # rows of expert e
            torch.testing.assert_close(B[:, e::E], m.B[e].detach())  # column j·E + e: B_e[:, j]
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["target_parameters"] == ["model.layers.0.mlp.experts.down_proj",
                                           "model.layers.0.mlp.experts.gate_up_proj",
                                           "model.layers.1.mlp.experts.down_proj"]
    assert (config["r"], config["rank_pattern"]) == (2, {"model.layers.1.mlp.experts.down_proj": 3})
    assert (config["lora_alpha"], config["alpha_pattern"]) == (6, {"model.layers.1.mlp.experts.down_proj": 3})


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_attention_and_experts_export_together(name, tmp_path):
    model = build(name)
    a = attach(model, {"attn": LoRA(4, alpha=8, rslora=True), "layers.1.attn.o": LoRA(2),
                       "ffn.experts.gate_up": LoRA(2, alpha=4, rslora=True), "layers.0.ffn.experts.down": LoRA(3)})
    randomize(a.parameters())
    expected = logits(model)
    export_peft(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["target_modules"] == sorted([f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qkv"]
                                              + ["model.layers.1.self_attn.o_proj"])
    assert config["target_parameters"] == ["model.layers.0.mlp.experts.down_proj",
                                           "model.layers.0.mlp.experts.gate_up_proj",
                                           "model.layers.1.mlp.experts.gate_up_proj"]
    assert config["use_rslora"] is False  # the o LoRA is not rslora: alphas follow s·r
    with pytest.warns(RuntimeWarning, match="rank_pattern keys did not match"):  # PEFT checks them on modules only
        loaded = peft.PeftModel.from_pretrained(build(name), str(tmp_path)).eval()
    torch.testing.assert_close(logits(loaded), expected, atol=ATOL, rtol=0)
    fresh = build(name)
    import_peft(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh), expected, atol=ATOL, rtol=0)


def test_expert_dropout_is_written_as_zero_with_a_warning(tmp_path):
    model = build()
    a = attach(model, {"ffn.experts": LoRA(2, dropout=0.1), "attn.q": LoRA(2)})
    randomize(a.parameters())
    expected = logits(model)
    with pytest.warns(UserWarning, match="refuses lora_dropout.*writing 0.0"):
        export_peft(model, tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["lora_dropout"] == 0.0
    torch.testing.assert_close(logits(peft.PeftModel.from_pretrained(build(), str(tmp_path)).eval()), expected,
                               atol=ATOL, rtol=0)


# ---- PEFT -> adaptune ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(MOE))
def test_import_matches_peft(name, tmp_path):
    expected = peft_adapter(name, tmp_path)
    model = build(name)
    assert (expected - logits(model)).abs().max() > 1e-2
    a = import_peft(model, tmp_path)
    torch.testing.assert_close(logits(model), expected, atol=ATOL, rtol=0)
    assert experts_specs(a) == {f"layers.{i}.ffn.experts.{p}": LoRA(4, alpha=8) for i in (0, 1)
                                for p in ("gate_up", "down")}


def test_import_of_attention_and_one_expert_weight_with_patterns(tmp_path):
    expected = peft_adapter("qwen3_moe", tmp_path, target_modules=["q_proj", "v_proj"],
                            target_parameters=["experts.down_proj"], use_rslora=True,
                            rank_pattern={"layers.1.mlp.experts.down_proj": 2}, alpha_pattern={"q_proj": 3})
    model = build("qwen3_moe")
    a = import_peft(model, tmp_path, task_name="peft")
    torch.testing.assert_close(logits(model), expected, atol=ATOL, rtol=0)
    specs = {sel: stack[0] for sel, stack in a.specs["peft"].items()}
    assert specs["layers.0.ffn.experts.down"] == LoRA(4, alpha=8, rslora=True)
    assert specs["layers.1.ffn.experts.down"] == LoRA(2, alpha=8, rslora=True)
    assert specs["model.layers.1.self_attn.q_proj"] == LoRA(4, alpha=3, rslora=True)
    assert len(specs) == 6


def test_imported_adapter_exports_back_to_the_same_peft_logits(tmp_path):
    expected = peft_adapter("olmoe", tmp_path / "peft", target_modules=["o_proj"])
    model = build("olmoe")
    import_peft(model, tmp_path / "peft")
    export_peft(model, tmp_path / "again")
    loaded = peft.PeftModel.from_pretrained(build("olmoe"), str(tmp_path / "again")).eval()
    torch.testing.assert_close(logits(loaded), expected, atol=ATOL, rtol=0)


# ---- refusals ------------------------------------------------------------------------------------

def test_export_refuses_dora_beside_expert_lora(tmp_path):
    a = attach(build(), {"ffn.experts": LoRA(2), "attn.q": DoRA(2)})
    with pytest.raises(AdaptuneError, match="ParamWrapper refuses use_dora.*attn.q_proj"):
        export_peft(a, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_export_refuses_dora_on_the_experts_unless_skipped(tmp_path):
    from adaptune import BindError
    try:
        a = attach(build(), {"ffn.experts": DoRA(2), "attn.q": LoRA(2)})
    except BindError:
        pytest.skip("DoRA does not bind to a mixture of experts in this build")
    with pytest.raises(AdaptuneError, match="does not export to PEFT's format.*refuses use_dora"):
        export_peft(a, tmp_path / "x")
    export_peft(a, tmp_path / "x", skip_unsupported=True)
    assert json.loads((tmp_path / "x" / CONFIG_NAME).read_text())["target_parameters"] is None


def _unchanged(model, before):
    assert not hasattr(model, "adaptune")
    torch.testing.assert_close(logits(model), before, atol=0, rtol=0)


def test_import_refuses_a_parameter_that_is_not_an_experts_weight(tmp_path):
    peft_adapter("mixtral", tmp_path, target_parameters=["mlp.gate.weight"])  # the router's weight
    model = build()
    before = logits(model)
    with pytest.raises(LoadError, match=r"'mlp\.gate\.weight' names model\.layers\.0\.mlp\.gate\.weight.*not a "
                                        r"mixture of experts' gate_up_proj / down_proj"):
        import_peft(model, tmp_path)
    _unchanged(model, before)


@pytest.mark.parametrize("problem, match", [
    ("dora", "use_dora with target_parameters"),
    ("pissa", "init_lora_weights='pissa' with target_parameters"),
    ("unknown entry", "'mlp.experts.up_proj' matches no parameter"),
    ("rank", r"config gives r=3: expected \(12, 32\) and \(96, 12\)"),
    ("other model", "fit neither weight"),
    ("half a wrapper", "experts.base_layer lacks lora_B.weight"),
    ("not targeted", "LoRA on gate_up_proj, which target_parameters does not name"),
])
def test_import_refusals_leave_the_model_unchanged(problem, match, tmp_path):
    peft_adapter("mixtral", tmp_path)
    if problem == "dora":
        edit_config(tmp_path, use_dora=True)
    elif problem == "pissa":
        edit_config(tmp_path, init_lora_weights="pissa")
    elif problem == "unknown entry":
        edit_config(tmp_path, target_parameters=BOTH + ["mlp.experts.up_proj"])
    elif problem == "rank":
        edit_config(tmp_path, rank_pattern={"gate_up_proj": 3})
    elif problem == "not targeted":
        edit_config(tmp_path, target_parameters=["mlp.experts.down_proj"])
    elif problem == "half a wrapper":
        from safetensors.torch import save_file
        tensors = load_file(str(tmp_path / WEIGHTS_NAME))
        del tensors["base_model.model.model.layers.1.mlp.experts.base_layer.lora_B.weight"]
        save_file(tensors, str(tmp_path / WEIGHTS_NAME))
    model = build("qwen3_moe" if problem == "other model" else "mixtral")
    before = logits(model)
    with pytest.raises(LoadError, match=match):
        import_peft(model, tmp_path)
    _unchanged(model, before)


def test_import_refuses_gpt_oss_experts_naming_the_layout(tmp_path):
    peft_adapter("gpt_oss", tmp_path)  # PEFT adapts them (is_transposed: (E, in, out)); adaptune's expert LoRA does not
    model = build("gpt_oss")
    with pytest.raises(LoadError, match="GptOssExperts stores its experts in a layout.*is_transposed=True"):
        import_peft(model, tmp_path)
    assert not hasattr(model, "adaptune")
