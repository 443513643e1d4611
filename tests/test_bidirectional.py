"""Bidirectional(): causal attention turned into encoder attention, padding still masked."""
import pytest
import torch
from helpers import VOCAB, perturb, tiny_gpt2, tiny_llama

from adaptune import Bidirectional, Prefix, attach, detach, load, save

MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama}


def build(name, impl):
    model = MODELS[name]()
    model.set_attn_implementation(impl)
    return model


def batch(padding="right"):
    ids = torch.randint(2, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if padding == "right":
        mask[1, 4:] = 0
    else:
        mask[1, :2] = 0
    return ids, mask


def hidden(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("name", MODELS)
def test_position_zero_sees_later_tokens_only_when_bidirectional(name, impl):
    model = build(name, impl)
    ids, mask = batch()
    later = ids.clone()
    later[0, 3] = (later[0, 3] + 1) % VOCAB
    adaptation = attach(model, {"attn": Bidirectional()})
    assert (hidden(model, ids, mask)[0, 0] - hidden(model, later, mask)[0, 0]).abs().max() > 1e-4
    with adaptation.disabled():
        torch.testing.assert_close(hidden(model, ids, mask)[0, 0], hidden(model, later, mask)[0, 0], atol=0, rtol=0)



@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("name", MODELS)
def test_in_one_layer_the_last_position_is_unchanged(name, impl):
    """The last position sees every token either way: in a one-layer model its output is the causal one."""
    model = MODELS[name](**{"n_layer" if name == "gpt2" else "layers": 1})
    model.set_attn_implementation(impl)
    ids, _ = batch()
    full = torch.ones_like(ids)
    adaptation = attach(model, {"attn": Bidirectional()})
    on = hidden(model, ids, full)
    with adaptation.disabled():
        off = hidden(model, ids, full)
    torch.testing.assert_close(on[:, -1], off[:, -1], atol=1e-5, rtol=0)
    assert (on[:, 0] - off[:, 0]).abs().max() > 1e-4


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("name", MODELS)
def test_padding_stays_masked(name, impl, padding):
    model = build(name, impl)
    ids, mask = batch(padding)
    attach(model, {"attn": Bidirectional()})
    changed = ids.clone()
    changed[1][mask[1] == 0] = 5  # only padded tokens change
    real = mask[1] == 1
    torch.testing.assert_close(hidden(model, ids, mask)[1][real], hidden(model, changed, mask)[1][real],
                               atol=1e-6, rtol=0)


def test_only_the_selected_layers_are_bidirectional_and_prefixes_still_count():
    model = build("llama", "sdpa")
    ids, mask = batch()
    later = ids.clone()
    later[0, 4] = (later[0, 4] + 1) % VOCAB
    adaptation = attach(model, {"layers.1.attn": Bidirectional() | Prefix(2)})
    perturb(adaptation, std=0.5)
    with torch.no_grad():
        first = [model(input_ids=x, attention_mask=mask, output_hidden_states=True).hidden_states for x in (ids, later)]
    torch.testing.assert_close(first[0][1][0, 0], first[1][1][0, 0], atol=0, rtol=0)  # after layer 0: causal
    assert (first[0][2][0, 0] - first[1][2][0, 0]).abs().max() > 1e-4  # after layer 1: sees position 4
    with adaptation.disabled():
        base = hidden(model, ids, mask)
    assert (hidden(model, ids, mask) - base).abs().max() > 1e-4


def test_a_saved_bidirectional_stack_reloads(tmp_path):
    ids, mask = batch()
    model = build("gpt2", "sdpa")
    attach(model, {"layers.0.attn": Bidirectional() | Prefix(2)})
    perturb(model.adaptune, std=0.3)
    expected = hidden(model, ids, mask)
    save(model, tmp_path / "a.safetensors")
    detach(model)
    fresh = build("gpt2", "sdpa")
    load(fresh, tmp_path / "a.safetensors")
    torch.testing.assert_close(hidden(fresh, ids, mask), expected, atol=0, rtol=0)
