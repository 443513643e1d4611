"""Merge folds LoRA/DoRA into the base weights; unmerge and detach restore them bit-exact."""
import math

import pytest
import torch

from adaptune import Adapter, BitFit, DoRA, LoRA, MergeError, attach, detach
from helpers import VOCAB, bound, out, randomize, tiny_gpt2


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(model, state):
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


def hook_state(model):
    return {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks), "forward" in m.__dict__)
            for n, m in model.named_modules()}


@pytest.mark.parametrize("component", [LoRA(4, alpha=8), DoRA(4)], ids=["lora", "dora"])
def test_merged_outputs_equal_unmerged_outputs(model, ids, component):
    adaptation = attach(model, {"attn": component, "ffn": component})
    randomize(adaptation, std=0.05)
    unmerged = out(model, ids)
    adaptation.merge()
    assert adaptation.merged
    torch.testing.assert_close(out(model, ids), unmerged, rtol=1e-4, atol=1e-5)


def test_merge_changes_the_base_weights_and_unmerge_restores_them_bit_exact(model, ids):
    base = snapshot(model)
    adaptation = attach(model, {"attn": LoRA(4), "ffn.down": DoRA(2)})
    randomize(adaptation)
    before = out(model, ids)
    adaptation.merge()
    changed = [k for k, v in base.items() if not torch.equal(model.state_dict()[k], v)]
    assert changed and all(k.endswith(".weight") for k in changed)
    adaptation.unmerge()
    assert not adaptation.merged
    assert all(torch.equal(model.state_dict()[k], v) for k, v in base.items())
    assert torch.equal(out(model, ids), before)


def test_merging_twice_does_not_add_the_update_twice(model, ids):
    adaptation = attach(model, {"attn": LoRA(4)})
    randomize(adaptation)
    expected = out(model, ids)
    adaptation.merge().merge()
    torch.testing.assert_close(out(model, ids), expected, rtol=1e-4, atol=1e-5)


def test_merged_gpt2_c_attn_equals_w_plus_scaled_ba_on_each_third():
    model = tiny_gpt2()
    c_attn = model.transformer.h[0].attn.c_attn
    W = c_attn.weight.T.clone()  # (96, 32)
    adaptation = attach(model, {"layers.0.attn": LoRA(2, alpha=6)})
    randomize(adaptation)
    adaptation.merge()
    for part, name in enumerate("qkv"):
        (lora,) = bound(adaptation, f"attn.{name}", 0)
        rows = slice(32 * part, 32 * (part + 1))
        torch.testing.assert_close(c_attn.weight.T[rows], W[rows] + 3.0 * lora.B @ lora.A)


def test_dora_merge_equals_dora_forward():
    model = tiny_gpt2()
    c_fc = model.transformer.h[1].mlp.c_fc
    adaptation = attach(model, {"layers.1.ffn.up": DoRA(4, alpha=2)})
    randomize(adaptation)
    (dora,) = bound(adaptation, "ffn.up", 1)
    x = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(0))
    forward = c_fc(x)
    adaptation.merge()
    Wm = c_fc.weight.T  # now (m / n) ⊙ (W + s·B·A)
    assert torch.equal(c_fc(x), x @ c_fc.weight + c_fc.bias)  # merged: the plain Conv1D path
    torch.testing.assert_close(c_fc(x), forward, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(Wm.norm(dim=1), dora.magnitude.abs())  # rows of norm |m|


def test_nan_in_b_raises_merge_error_and_leaves_weights_untouched(model):
    adaptation = attach(model, {"attn": LoRA(2), "ffn": LoRA(2)})
    randomize(adaptation)
    base = {k: v for k, v in snapshot(model).items() if not k.startswith("adaptune.")}
    last = list(adaptation.bindings())[-1].module  # the last update checked: nothing may merge first
    last.B.data[0, 0] = math.nan
    with pytest.raises(MergeError, match="non-finite") as err:
        adaptation.merge()
    assert "ffn.down" in str(err.value)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in base.items()) and not adaptation.merged


def test_switching_or_disabling_while_merged_raises(model):
    adaptation = attach(model, {"attn": LoRA(2)}, tasks={"a": {"ffn": LoRA(2)}, "b": {"ffn": LoRA(2)}})
    adaptation.merge()
    with pytest.raises(MergeError, match="unmerge"):
        adaptation.use("b")
    with pytest.raises(MergeError, match="unmerge"):
        adaptation.disable()
    assert adaptation.task == "a" and adaptation.enabled
    adaptation.use("a")  # staying on the merged task is fine
    adaptation.unmerge().use("b")
    assert adaptation.task == "b"


def test_adapters_are_not_merged_and_keep_running(model, ids):
    adaptation = attach(model, {"attn": LoRA(2), "ffn": Adapter(4)})
    randomize(adaptation, std=0.05)
    expected = out(model, ids)
    adaptation.merge()
    torch.testing.assert_close(out(model, ids), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("merge", [False, True], ids=["unmerged", "merged"])
def test_detach_restores_the_original_model_bit_exact(model, ids, merge):
    path = "transformer.wte.weight" if model.config.model_type == "gpt2" else "embeddings.word_embeddings.weight"
    model.get_parameter(path).requires_grad_(False)  # an originally frozen parameter stays frozen
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    base, hooks, before = snapshot(model), hook_state(model), out(model, ids)
    adaptation = attach(model, {"attn": LoRA(4) | Adapter(4, placement="parallel"), "ffn.up": DoRA(2),
                                "ffn": Adapter(8)})
    randomize(adaptation)
    if merge:
        adaptation.merge()
    assert detach(model) is model
    assert "adaptune" not in model._modules and not hasattr(model, "adaptune")
    assert same_state(model, base)
    assert hook_state(model) == hooks
    assert all(type(m).forward is m.forward.__func__ for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not flags[path]
    assert torch.equal(out(model, ids), before)


def test_a_detached_model_can_be_attached_again(model, ids):
    before = out(model, ids)
    detach(attach(model, {"attn": LoRA(2)}))
    adaptation = attach(model, {"ffn": Adapter(4)})
    assert model.adaptune is adaptation and torch.equal(out(model, ids), before)


def test_merging_into_a_tied_weight_raises_and_changes_nothing(ids):
    model = tiny_gpt2()  # lm_head shares its weight with the token embedding
    adaptation = attach(model, {"attn": LoRA(2), "lm_head": LoRA(2)})
    randomize(adaptation)
    base, expected = snapshot(model), out(model, ids)
    with pytest.raises(MergeError, match="tied to transformer.wte"):
        adaptation.merge()
    assert same_state(model, base) and not adaptation.merged
    assert torch.equal(out(model, ids), expected)


def test_merged_float_of_a_float_base_folds_fused_slices_and_biases_and_refuses_tied_weights():
    from adaptune import merged_float

    model = tiny_gpt2()
    adaptation = attach(model, {"attn": LoRA(2) | BitFit(), "ffn.up": DoRA(2)})
    randomize(adaptation)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    expected = model(input_ids=ids).logits
    plain = merged_float(model)
    assert not hasattr(plain, "adaptune") and type(plain.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    torch.testing.assert_close(plain(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=0, rtol=0)
    detach(model)
    attach(model, {"embed": LoRA(2)})
    with pytest.raises(MergeError, match=r"embed \(layer None\) updates a weight tied to lm_head"):
        merged_float(model)


def test_an_adaptation_holds_no_base_weight_alive(model):
    """fully_shard (or a user) may replace base parameters after attach: the adaptation must not keep the old
    tensors alive (under FSDP2 that would hold every full weight beside its shard), and detach still restores
    the requires_grad flags, by name, on the parameters the model has then."""
    import gc
    import weakref
    attach(model, {"attn": LoRA(2) | Adapter(4), "ffn.up": DoRA(2)})
    base = [(m, name) for m in model.modules() if not any(m is x for x in model.adaptune.modules())
            for name, p in m._parameters.items() if p is not None]
    olds, new = [], {}  # a tied weight (GPT-2's wte and head) stays tied
    for module, name in base:
        old = module._parameters[name]
        if id(old) not in new:
            new[id(old)] = torch.nn.Parameter(old.detach().clone(), requires_grad=False)
            olds.append(weakref.ref(old))
        module._parameters[name] = new[id(old)]
    del old
    gc.collect()
    assert olds and all(ref() is None for ref in olds)
    detach(model)
    assert all(p.requires_grad for p in model.parameters())
