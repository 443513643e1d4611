"""The AdaVAE model: a bidirectional encoder that stops after L_enc layers, a causal decoder conditioned
on z, and the posterior, all on one frozen base."""
import pytest
import torch
import torch.nn.functional as F
from helpers import VOCAB, tiny_gpt2, tiny_llama

from adaptune import ConfigError
from adaptune.experiments.vae.model import VAE, VAEConfig, default_encoder_layers
from adaptune.sites import SiteMap

SMALL = dict(latent_dim=8, adapter_dim=8)
BASES = {"gpt2": lambda: tiny_gpt2(n_layer=3), "llama": lambda: tiny_llama(layers=3)}


def batch():
    ids = torch.randint(2, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return ids, mask


def later(ids):
    out = ids.clone()
    out[:, 3] = (out[:, 3] + 1) % VOCAB
    return out


@pytest.mark.parametrize("gen", ["attn", "pool"])
@pytest.mark.parametrize("name", BASES)
def test_the_encoder_is_bidirectional_and_the_decoder_causal(name, gen):
    vae = VAE(BASES[name](), VAEConfig(**SMALL, latent_gen=gen))
    ids, mask = batch()
    with torch.no_grad():
        if gen == "pool":  # the pooled feature reads position 0 alone: it must see the later change
            assert (vae.encode(ids, mask)[0] - vae.encode(later(ids), mask)[0]).abs().max() > 1e-6
        z = torch.randn(2, 8)
        with vae.adaptation.using("decoder"), vae.adaptation.condition(z):
            a = vae.base(input_ids=ids, attention_mask=mask).logits
            b = vae.base(input_ids=later(ids), attention_mask=mask).logits
    torch.testing.assert_close(a[:, :3], b[:, :3], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", BASES)
def test_the_encoder_stops_after_its_layers_and_ignores_padding(name):
    vae = VAE(BASES[name](), VAEConfig(**SMALL, encoder_layers=2))
    ran = []
    SiteMap(vae.base).towers[0].layers[2].register_forward_hook(lambda *a: ran.append(1))
    ids, mask = batch()
    with torch.no_grad():
        mean, logvar = vae.encode(ids, mask)
        padded = ids.clone()
        padded[1, 5:] = 4
        again = vae.encode(padded, mask)
    assert not ran and mean.shape == logvar.shape == (2, 8)
    torch.testing.assert_close(again[0], mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(again[1], logvar, atol=1e-6, rtol=0)


def test_log_px_given_z_sums_the_scored_tokens():
    vae = VAE(BASES["gpt2"](), VAEConfig(**SMALL))
    ids, mask = batch()
    z = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = vae.log_px_given_z(z, ids, mask)
        with vae.adaptation.using("decoder"), vae.adaptation.condition(z):
            logits = vae.base(input_ids=ids, attention_mask=mask).logits
        target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        expected = -F.cross_entropy(logits[:, :-1].transpose(1, 2), target, reduction="none", ignore_index=-100).sum(1)
        many = vae.log_px_given_zs(torch.stack([z, z + 1], dim=1), ids, mask)  # (B, 2)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(many[:, 0], got, atol=1e-4, rtol=0)
    assert (many[:, 1] - got).abs().max() > 1e-4  # z matters


@pytest.mark.parametrize("cfg", [VAEConfig(**SMALL), VAEConfig(**SMALL, injection="both", prefix=2,
                                                                placement="attn-serial"),
                                 VAEConfig(**SMALL, finetune=True)])
def test_encoder_and_decoder_parameters_are_disjoint_and_all_that_trains(cfg):
    vae = VAE(BASES["llama"](), cfg)
    enc, dec = vae.trainable("encoder"), vae.trainable("decoder")
    assert {id(p) for p in enc}.isdisjoint({id(p) for p in dec})
    trained = {id(p) for p in vae.parameters() if p.requires_grad}
    assert trained == {id(p) for p in enc + dec}
    base = [p for n, p in vae.base.named_parameters() if not n.startswith("adaptune.")]
    assert all(p.requires_grad == cfg.finetune for p in base)


def test_generation_from_z_is_deterministic_under_a_seed():
    vae = VAE(BASES["gpt2"](), VAEConfig(**SMALL))
    z = torch.randn(2, 8, generator=torch.Generator().manual_seed(2))
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        outs.append(vae.generate(z, bos_token_id=0, max_new_tokens=5, do_sample=True, top_k=10))
    assert torch.equal(*outs) and outs[0].shape == (2, 6)


@pytest.mark.parametrize("kw, words", [({"injection": "xyz"}, "injection must be one of psa, atm, both"),
                                       ({"latent_gen": "mean"}, "latent_gen must be one of attn, pool"),
                                       ({"latent_dim": 0}, "latent_dim must be a positive integer"),
                                       ({"prefix": -1}, "prefix must be a non-negative integer")])
def test_bad_configs_say_what_is_valid(kw, words):
    with pytest.raises(ConfigError, match=words):
        VAEConfig(**kw)
    with pytest.raises(ConfigError, match="more than the base's 3 layers"):
        VAE(BASES["gpt2"](), VAEConfig(**SMALL, encoder_layers=4))


def test_default_encoder_depth_is_two_thirds():
    assert [default_encoder_layers(n) for n in (1, 3, 12, 30)] == [1, 2, 8, 20]


@pytest.mark.parametrize("name, norm", [("gpt2", "transformer.ln_f"), ("llama", "model.norm")])
def test_the_encoder_output_goes_through_the_base_final_norm(name, norm):
    vae = VAE(BASES[name](), VAEConfig(**SMALL, latent_gen="pool"))
    assert vae._norm is vae.base.get_submodule(norm)
    ids, mask = batch()
    with torch.no_grad():
        before = vae.encode(ids, mask)[0]
        vae.base.get_submodule(norm).weight.mul_(3.0)
        assert (vae.encode(ids, mask)[0] - before).abs().max() > 1e-4
