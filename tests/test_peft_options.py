"""PEFT's everyday LoRA options: rsLoRA, PiSSA / OLoRA initialisation, named adapter directories.

Each both ways against PEFT on tiny models: adaptune -> export_peft -> PEFT, and PEFT -> import_peft.
"""
import json

import peft
import pytest
import torch
from helpers import bound, perturb, tiny_bert, tiny_gpt2
from test_peft_format import ATOL, every_output, load_peft, randomize_adaptation, randomize_peft

import adaptune
from adaptune import ConfigError, DoRA, LoadError, LoRA, attach
from adaptune.components.base import Component
from adaptune.peft_export import CONFIG_NAME, export_peft
from adaptune.peft_import import import_peft


def specs_of(adaptation):
    return {sel: stack[0] for sel, stack in adaptation.specs[None].items()}


def peft_factors(peft_model):
    return torch.nn.ModuleList(m for n, m in peft_model.named_modules()
                               if n.endswith(("lora_A.default", "lora_B.default")))


# ---- the options themselves ----------------------------------------------------------------------

def test_rslora_scale_is_alpha_over_sqrt_r_and_options_round_trip():
    assert LoRA(4, alpha=8, rslora=True).scale == 4.0 and LoRA(16, alpha=2, rslora=True).scale == 0.5
    assert LoRA(4, rslora=True).scale == 1.0 and DoRA(9, alpha=6, rslora=True).scale == 2.0
    for c in (LoRA(4, alpha=8, rslora=True, init="pissa"), LoRA(2, init="olora"), DoRA(4, rslora=True)):
        assert Component.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert Component.from_dict({"type": "LoRA", "r": 4, "alpha": 8, "dropout": 0.0}) == LoRA(4, alpha=8)  # old files
    with pytest.raises(ConfigError, match="init must be one of"):
        LoRA(4, init="loftq")
    with pytest.raises(ConfigError, match="rslora must be True or False"):
        LoRA(4, rslora="yes")
    with pytest.raises(ConfigError, match="DoRA supports init='default' only"):
        DoRA(4, init="pissa")


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("build", [tiny_gpt2, tiny_bert])
def test_fresh_pissa_olora_keep_outputs_and_leave_the_base_bit_exact(init, build, ids, tmp_path):
    model = build()
    before = every_output(model, ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    a = attach(model, {"attn": LoRA(4, alpha=8, init=init, rslora=True), "ffn": LoRA(2, init=init)})
    torch.testing.assert_close(every_output(model, ids), before, atol=ATOL, rtol=0)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items() if not k.startswith("adaptune."))
    perturb(a, std=0.05)
    changed = every_output(model, ids)
    assert (changed - before).abs().max() > 1e-3
    a.merge()
    torch.testing.assert_close(every_output(model, ids), changed, atol=ATOL, rtol=0)
    a.unmerge()
    a.save(tmp_path / "saved")
    a.detach()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # bit-exact
    adaptune.load(model, tmp_path / "saved")
    torch.testing.assert_close(every_output(model, ids), changed, atol=ATOL, rtol=0)


def test_pissa_factors_hold_the_top_singular_part_and_olora_the_qr_part():
    model = tiny_bert()
    W = model.encoder.layer[0].attention.self.query.weight.detach()  # (32, 32)
    a = attach(model, {"layers.0.attn.q": LoRA(4, alpha=8, init="pissa"), "layers.0.attn.k": LoRA(3, init="olora")})
    (p,) = bound(a, "attn.q", 0)
    U, S, Vh = torch.linalg.svd(W)
    torch.testing.assert_close(2.0 * p.B0 @ p.A0, U[:, :4] @ torch.diag(S[:4]) @ Vh[:4], atol=1e-5, rtol=0)
    assert torch.equal(p.A, p.A0) and torch.equal(p.B, p.B0) and not p.A0.requires_grad
    (o,) = bound(a, "attn.k", 0)
    W = model.encoder.layer[0].attention.self.key.weight.detach()
    Q, _ = torch.linalg.qr(W)
    torch.testing.assert_close(o.B0 @ o.A0, Q[:, :3] @ Q[:, :3].T @ W, atol=1e-5, rtol=0)


# ---- rsLoRA both ways ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", [LoRA, DoRA])
@pytest.mark.parametrize("build, spec", [
    (tiny_bert, lambda K: {"attn": K(4, alpha=8, rslora=True), "ffn": K(2, alpha=3, rslora=True)}),
    (tiny_gpt2, lambda K: {"attn": K(4, alpha=8, rslora=True), "attn.o": K(2, rslora=True)}),
])
def test_rslora_exports_to_peft_and_back(build, spec, kind, ids, tmp_path):
    model = build()
    randomize_adaptation(attach(model, spec(kind)))
    expected = every_output(model, ids)
    export_peft(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["use_rslora"] is True
    torch.testing.assert_close(every_output(load_peft(build, tmp_path), ids), expected, atol=ATOL, rtol=0)
    fresh = build()
    specs = specs_of(import_peft(fresh, tmp_path))
    assert all(c.rslora and type(c) is kind for c in specs.values())
    torch.testing.assert_close(every_output(fresh, ids), expected, atol=ATOL, rtol=0)


def test_mixed_rslora_exports_exact_scales_without_the_flag(ids, tmp_path):
    model = tiny_bert()
    randomize_adaptation(attach(model, {"attn.q": LoRA(4, alpha=8, rslora=True), "attn.v": LoRA(2, alpha=3)}))
    export_peft(model, tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["use_rslora"] is False
    torch.testing.assert_close(every_output(load_peft(tiny_bert, tmp_path), ids), every_output(model, ids),
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("build, kw", [
    (tiny_bert, dict(target_modules=["query", "value", "dense"], rank_pattern={"intermediate.dense": 2})),
    (tiny_gpt2, dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
])
def test_peft_rslora_imports(build, kw, use_dora, ids, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, use_dora=use_dora, **kw)
    peft_model = peft.get_peft_model(build(), config).eval()
    randomize_peft(peft_model)
    expected = every_output(peft_model, ids)
    peft_model.save_pretrained(str(tmp_path))
    model = build()
    specs = specs_of(import_peft(model, tmp_path))
    assert all(c.rslora for c in specs.values())
    torch.testing.assert_close(every_output(model, ids), expected, atol=ATOL, rtol=0)


# ---- PiSSA / OLoRA both ways ---------------------------------------------------------------------

@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("build", [tiny_gpt2, tiny_bert])
def test_pissa_olora_export_as_rank_2r_lora_for_the_original_base(build, init, rslora, ids, tmp_path):
    model = build()
    a = attach(model, {"attn.q": LoRA(4, alpha=8, init=init, rslora=rslora), "attn.o": LoRA(2, init=init)})
    perturb(a, std=0.05)
    expected = every_output(model, ids)
    export_peft(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["init_lora_weights"] is True and config["use_rslora"] is False  # attn.o is not rslora
    assert sorted({config["r"], *config["rank_pattern"].values()}) == [4, 8]
    torch.testing.assert_close(every_output(load_peft(build, tmp_path), ids), expected, atol=ATOL, rtol=0)
    fresh = build()
    specs = specs_of(import_peft(fresh, tmp_path))  # plain LoRA of rank 2r on the original base
    assert {c.init for c in specs.values()} == {"default"}
    torch.testing.assert_close(every_output(fresh, ids), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("init, build, targets", [
    ("pissa", tiny_bert, ["query", "value"]), ("pissa", tiny_gpt2, ["c_attn", "c_proj"]),
    ("olora", tiny_bert, ["query", "value", "dense"]),
])
def test_unconverted_peft_pissa_olora_import_onto_the_original_base(init, build, targets, rslora, ids, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=init, use_rslora=rslora, target_modules=targets,
                             fan_in_fan_out=build is tiny_gpt2)
    peft_model = peft.get_peft_model(build(), config).eval()  # its base now holds W − s·B₀·A₀
    perturb(peft_factors(peft_model), std=0.05)
    expected = every_output(peft_model, ids)
    peft_model.save_pretrained(str(tmp_path))
    torch.testing.assert_close(every_output(load_peft(build, tmp_path), ids), expected, atol=ATOL, rtol=0)
    model = build()
    specs = specs_of(import_peft(model, tmp_path))
    assert {c.init for c in specs.values()} == {init} and all(c.rslora == rslora for c in specs.values())
    torch.testing.assert_close(every_output(model, ids), expected, atol=ATOL, rtol=0)


def test_converted_peft_pissa_imports_as_plain_lora(ids, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa", target_modules=["query", "value"])
    peft_model = peft.get_peft_model(tiny_bert(), config).eval()
    peft_model.save_pretrained(str(tmp_path / "init"))  # the initial factors, before training
    perturb(peft_factors(peft_model), std=0.05)
    expected = every_output(peft_model, ids)
    peft_model.save_pretrained(str(tmp_path / "lora"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    assert json.loads((tmp_path / "lora" / CONFIG_NAME).read_text())["r"] == 8
    model = tiny_bert()
    specs = specs_of(import_peft(model, tmp_path / "lora"))
    assert set(specs.values()) == {LoRA(8, alpha=16)}
    torch.testing.assert_close(every_output(model, ids), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("init, match", [("pissa_niter_4", "pissa_niter_4"), ("corda", "corda")])
def test_peft_inits_adaptune_cannot_recompute_are_refused(init, match, tmp_path):
    randomize_adaptation(attach(model := tiny_bert(), {"attn": LoRA(4)}))
    export_peft(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, "init_lora_weights": init}))
    with pytest.raises(LoadError, match=f"init_lora_weights='{match}'.*path_initial_model_for_weight_conversion"):
        import_peft(tiny_bert(), tmp_path)


def test_peft_olora_on_conv1d_is_refused(tmp_path):
    export_peft(attach(tiny_gpt2(), {"attn.o": LoRA(4)}), tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, "init_lora_weights": "olora"}))
    model = tiny_gpt2()
    with pytest.raises(LoadError, match="Conv1D with init_lora_weights 'olora'"):
        import_peft(model, tmp_path)
    assert not hasattr(model, "adaptune")


# ---- named adapter directories -------------------------------------------------------------------

def test_named_adapter_directories(ids, tmp_path):
    peft_model = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=4, target_modules=["query"]), adapter_name="mine")
    randomize_peft(peft_model)
    expected = every_output(peft_model.eval(), ids)
    peft_model.save_pretrained(str(tmp_path))
    assert (tmp_path / "mine" / CONFIG_NAME).is_file() and not (tmp_path / CONFIG_NAME).exists()
    model = tiny_bert()
    import_peft(model, tmp_path)  # the one named adapter
    torch.testing.assert_close(every_output(model, ids), expected, atol=ATOL, rtol=0)
    peft_model.add_adapter("other", peft.LoraConfig(r=2, target_modules=["value"]))
    peft_model.save_pretrained(str(tmp_path))
    with pytest.raises(LoadError, match="several PEFT adapters \\('mine', 'other'\\).*adapter_name="):
        import_peft(tiny_bert(), tmp_path)
    specs = specs_of(import_peft(model := tiny_bert(), tmp_path, adapter_name="other"))
    assert set(specs.values()) == {LoRA(2, alpha=8)}
    with pytest.raises(LoadError, match="no adapter named 'x'.*'mine', 'other'"):
        import_peft(tiny_bert(), tmp_path, adapter_name="x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoadError, match=f"no {CONFIG_NAME}, nor any subdirectory <adapter name>/{CONFIG_NAME}"):
        import_peft(tiny_bert(), tmp_path / "empty")
