"""Every mistake raises the right AdaptuneError, says what is valid, and leaves the model unchanged."""
import pytest
import torch
from helpers import out
from torch import nn

from adaptune import (Adapter, AdaptuneError, BindError, ConfigError, DoRA, LoRA, SiteError, Stack, attach,
                      detach)
from adaptune.hooks.sublayer import SublayerHook


def fingerprint(model):
    """Everything attach may touch: weights, flags, structure, hooks and instance forwards."""
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            [(n, type(m).__name__) for n, m in model.named_modules()],
            {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks), "forward" in m.__dict__)
             for n, m in model.named_modules()})


def assert_unchanged(model, ids, before, output):
    state, flags, structure, hooks = fingerprint(model)
    assert state.keys() == before[0].keys() and all(torch.equal(state[k], before[0][k]) for k in state)
    assert flags == before[1] and structure == before[2] and hooks == before[3]
    assert not hasattr(model, "adaptune")
    assert torch.equal(out(model, ids), output)


@pytest.mark.parametrize("component, pattern", [
    (lambda: LoRA(0), "r must be a positive integer, got 0"),
    (lambda: LoRA(-2), "r must be a positive integer"),
    (lambda: DoRA(0), "r must be a positive integer"),
    (lambda: LoRA(2.5), "r must be a positive integer"),
    (lambda: LoRA(True), "r must be a positive integer"),
    (lambda: LoRA(4, alpha=0), "alpha must be a positive finite number"),
    (lambda: LoRA(4, dropout=1.0), r"dropout must be a float in \[0, 1\)"),
    (lambda: Adapter(0), "dim must be a positive integer"),
    (lambda: Adapter(8, placement="middle"), "placement must be one of 'serial', 'parallel'; got 'middle'"),
    (lambda: Adapter(8, act="swish"), "act must be one of .*'relu'.*; got 'swish'"),
    (lambda: Adapter(8, scale=-1.0), "scale must be a positive finite number"),
])
def test_bad_constructor_arguments_raise_config_error(component, pattern):
    with pytest.raises(ConfigError, match=pattern):
        component()


@pytest.mark.parametrize("spec, error, words", [
    ({"attention": LoRA(4)}, SiteError, ["unknown site 'attention'", "attn", "ffn.down", "layers.A-B"]),
    ({"layers.5.attn": LoRA(4)}, SiteError, ["layers 5", "out of range", "2 layers (0-1)"]),
    ({"layers.0-2.ffn": Adapter(4)}, SiteError, ["0-2", "out of range", "2 layers"]),
    ({"layers.x.attn": LoRA(4)}, SiteError, ["bad layer range 'x'", "A-B"]),
    ({"layers.0.embed": LoRA(4)}, SiteError, ["'embed' has no layers"]),
    ({"attn.q": Adapter(8)}, BindError, ["Adapter(dim=8", "cannot bind to 'attn.q'", "attn, ffn"]),
    ({"embed": Adapter(4)}, BindError, ["Adapter(dim=4", "cannot bind to 'embed'", "attn, ffn"]),
    ({"attn": LoRA(33)}, BindError, ["r=33 is larger than the layer", "1..32"]),
    ({"ffn": DoRA(40)}, BindError, ["r=40", "1..32"]),
    ({"attn": LoRA(2), "attn.q": LoRA(2)}, BindError, ["two low-rank updates", "attn.q", "at most one"]),
    ({"attn.v": LoRA(2) | DoRA(2)}, BindError, ["two low-rank updates", "LoRAModule and DoRAModule"]),
])
def test_bad_selectors_raise_the_right_error_naming_what_is_valid(model, spec, error, words):
    with pytest.raises(error) as err:
        attach(model, spec)
    assert isinstance(err.value, AdaptuneError)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_lora_on_a_module_path_that_is_not_a_linear_raises_bind_error(model):
    path = "transformer.h.0.attn" if model.config.model_type == "gpt2" else "encoder.layer.0.attention"
    with pytest.raises(BindError, match=f"'{path}': it is a .*not a Linear or Conv1D"):
        attach(model, {path: LoRA(2)})


def test_named_sites_on_an_unknown_architecture_suggest_module_paths():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(SiteError, match="no site map.*'0'"):
        attach(model, {"attn": LoRA(2)})
    attach(model, {"2": LoRA(2)})  # a module path works on any model
    assert "forward" in model[2].__dict__


def test_a_shared_and_a_task_lora_on_one_projection_conflict_but_two_tasks_do_not(model):
    with pytest.raises(BindError, match="task 'a'"):
        attach(model, {"attn.q": LoRA(2)}, tasks={"a": {"attn": LoRA(2)}})
    adaptation = attach(model, tasks={"a": {"attn": LoRA(2)}, "b": {"attn": DoRA(2)}})
    assert adaptation.task_names == ["a", "b"]


@pytest.mark.parametrize("call, words", [
    (lambda m: attach(object(), {"attn": LoRA(2)}), ["torch.nn.Module", "object"]),
    (lambda m: attach(m, {}), ["nothing to attach"]),
    (lambda m: attach(m), ["nothing to attach"]),
    (lambda m: attach(m, {"attn": "LoRA(4)"}), ["spec['attn']", "component or a stack", "str"]),
    (lambda m: attach(m, {"nope": Stack()}), ["spec['nope']", "empty stack"]),
    (lambda m: attach(m, [("attn", LoRA(4))]), ["must map selectors to components"]),
    (lambda m: attach(m, tasks={}), ["tasks must map task names"]),
    (lambda m: attach(m, tasks={"a b": {"ffn": Adapter(4)}}), ["task names", "'a b'"]),
])
def test_bad_attach_arguments_raise_config_error(model, call, words):
    with pytest.raises(ConfigError) as err:
        call(model)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_attaching_twice_raises_and_keeps_the_first_adaptation(model, ids):
    first = attach(model, {"attn": LoRA(2)})
    before, output = fingerprint(model), out(model, ids)
    with pytest.raises(ConfigError, match="already has an adaptation attached.*detach"):
        attach(model, {"ffn": Adapter(4)})
    assert model.adaptune is first
    after = fingerprint(model)
    assert after[1:] == before[1:] and torch.equal(out(model, ids), output)


@pytest.mark.parametrize("spec, tasks", [
    ({"attn": LoRA(4), "ffn": Adapter(8), "nope": LoRA(2)}, None),
    ({"attn": LoRA(4) | Adapter(4, placement="parallel"), "layers.7.ffn": Adapter(4)}, None),
    ({"ffn": DoRA(2), "attn": LoRA(2), "attn.k": LoRA(2)}, None),
    ({"attn": LoRA(4), "ffn": LoRA(1000)}, None),
    ({"attn": LoRA(4)}, {"a": {"ffn": Adapter(4)}, "b": {"embed": Adapter(4)}}),
])
def test_a_failing_attach_leaves_the_model_unchanged(model, ids, spec, tasks):
    next(model.parameters()).requires_grad_(False)  # an originally frozen parameter must stay frozen
    before, output = fingerprint(model), out(model, ids)
    with pytest.raises(AdaptuneError):
        attach(model, spec, tasks=tasks)
    assert_unchanged(model, ids, before, output)
    attach(model, {"attn": LoRA(2)})  # and it can still be adapted


def test_a_hook_failing_to_install_rolls_back_the_hooks_already_installed(model, ids, monkeypatch):
    before, output = fingerprint(model), out(model, ids)

    def broken(self):
        raise RuntimeError("cannot hook")
    monkeypatch.setattr(SublayerHook, "install", broken)
    with pytest.raises(RuntimeError, match="cannot hook"):
        attach(model, {"attn": LoRA(2), "ffn": Adapter(4)})  # projection hooks install first
    assert_unchanged(model, ids, before, output)


def test_detach_without_an_adaptation_raises(model):
    with pytest.raises(AdaptuneError, match="no adaptation attached"):
        detach(model)
