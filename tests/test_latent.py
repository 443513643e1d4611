"""Latent injection (PSA, AtM): a per-sample latent as extra keys and values of every attention layer."""
import pytest
import torch
from helpers import bound, perturb, tiny_gpt2, tiny_llama, VOCAB

from adaptune import PSA, AdaptuneError, AtM, ConfigError, Prefix, attach, detach

MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama}  # llama: grouped-query attention (2 kv heads of 4)


def ids_batch():
    return torch.randint(2, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))


def logits(model, adaptation, z, ids):
    with torch.no_grad(), adaptation.condition(z):
        return model(input_ids=ids).logits


@pytest.mark.parametrize("component", [PSA(8), AtM(8), PSA(8) | AtM(8)])
@pytest.mark.parametrize("name", MODELS)
def test_every_position_sees_z_and_nothing_later_leaks(name, component):
    model = MODELS[name]()
    adaptation = attach(model, {"attn": component})
    z = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
    other = z + 1.0
    ids = ids_batch()
    a, b = logits(model, adaptation, z, ids), logits(model, adaptation, other, ids)
    assert ((a - b).abs().amax(dim=-1) > 1e-5).all()  # every sample, every position
    later = ids.clone()
    later[:, 4:] = (later[:, 4:] + 1) % VOCAB
    torch.testing.assert_close(logits(model, adaptation, z, later)[:, :4], a[:, :4], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", MODELS)
def test_psa_equals_a_prefix_holding_its_key_and_value(name):
    """With one z for the whole batch, PSA is a one-position prefix of keys W_k·z and values W_v·z."""
    model = MODELS[name]()
    adaptation = attach(model, {"attn": PSA(8)})
    z = torch.randn(1, 8, generator=torch.Generator().manual_seed(2))
    ids = ids_batch()
    expected = logits(model, adaptation, z.expand(2, -1), ids)
    modules = {b.point.layer: b.module for b in adaptation.bindings()}
    detach(model)
    prefix = attach(model, {"attn": Prefix(1)})
    with torch.no_grad():
        for b in prefix.bindings():
            b.module.keys.copy_(modules[b.point.layer].key(z))
            b.module.values.copy_(modules[b.point.layer].value(z))
        torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=1e-5, rtol=0)


def test_atm_uses_one_map_for_key_and_value_and_counts_parameters():
    model = tiny_llama()
    kv = model.config.num_key_value_heads * (model.config.hidden_size // model.config.num_attention_heads)
    layers = model.config.num_hidden_layers
    atm = attach(model, {"attn": AtM(8)})
    assert atm.counts().shared == layers * 8 * kv
    (module,) = bound(atm, "attn", 0)
    k, v = module.kv(type("A", (), {"latent": torch.randn(3, 8)})())
    assert k is v and k.shape == (3, 1, kv)
    detach(model)
    assert attach(model, {"attn": PSA(8)}).counts().shared == 2 * layers * 8 * kv


@pytest.mark.parametrize("name", MODELS)
def test_generate_with_cache_equals_without_and_repeats_latents_for_beams(name):
    model = MODELS[name]()
    adaptation = attach(model, {"attn": PSA(8) | AtM(8)})
    perturb(adaptation, std=0.3)
    z = torch.randn(2, 8, generator=torch.Generator().manual_seed(3))
    ids = ids_batch()
    with torch.no_grad(), adaptation.condition(z):
        cached = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=True)
        plain = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False)
        beams = model.generate(ids, max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
    assert torch.equal(cached, plain) and beams.shape[0] == 4


def test_latents_are_checked():
    model = tiny_gpt2()
    adaptation = attach(model, {"attn": PSA(8)})
    ids = ids_batch()
    with pytest.raises(AdaptuneError, match="needs a latent"):
        model(input_ids=ids)
    for bad, words in [(torch.randn(8), "(batch, latent_dim)"), (torch.full((2, 8), float("nan")), "NaN"),
                       (torch.ones(2, 8, dtype=torch.long), "float tensor")]:
        with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
            with adaptation.condition(bad):
                pass
    with pytest.raises(ConfigError, match="takes latents of size 8, got 4"):
        logits(model, adaptation, torch.randn(2, 4), ids)
    with pytest.raises(AdaptuneError, match="the latent has 3 samples, the batch 2"):
        logits(model, adaptation, torch.randn(3, 8), ids)
    for rows, batch in ((1, 2), (2, 4)):  # a divisor is repeated inside generate() only (its beams, sequences)
        with pytest.raises(ConfigError, match=f"the latent has {rows} samples, the batch {batch}"):
            logits(model, adaptation, torch.randn(rows, 8), torch.randint(2, VOCAB, (batch, 6)))
    with pytest.raises(ConfigError, match="the latent has 2 samples, the batch 4"):  # a submodule, no model hook
        with torch.no_grad(), adaptation.condition(torch.randn(2, 8)):
            model.transformer(input_ids=torch.randint(2, VOCAB, (4, 6)))
    with pytest.raises(ConfigError, match="latent_dim"):
        PSA(0)
