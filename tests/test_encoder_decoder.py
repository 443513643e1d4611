"""Encoder-decoder models (T5, BART): two layer towers named `encoder` and `decoder`, cross-attention
sites, every component kind, cached generate == uncached, PEFT's format and adaptune's both ways."""
import peft
import pytest
import torch
import transformers as T
from helpers import VOCAB, perturb

from adaptune import (Adapter, BindError, DoRA, HyperAdapter, LoRA, Prefix, PromptTuning, SiteError, attach, detach,
                      load, save)
from adaptune.peft_export import export_peft
from adaptune.peft_import import import_peft
from adaptune.points import CROSS_SUBLAYER, PROJECTION, SUBLAYER
from adaptune.sites import SiteMap


def t5(seed=0):
    torch.manual_seed(seed)
    return T.T5ForConditionalGeneration(T.T5Config(
        d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, vocab_size=VOCAB,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).eval()


def bart(seed=0):
    torch.manual_seed(seed)
    return T.BartForConditionalGeneration(T.BartConfig(
        d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=48, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0,
        bos_token_id=0, eos_token_id=1, decoder_start_token_id=0, forced_eos_token_id=None)).eval()


MODELS = {"t5": t5, "bart": bart}
DECODER_LAYERS = {"t5": 2, "bart": 3}  # transformers' T5 cache needs as many decoder layers as encoder layers
EVERY_KIND = {"attn": LoRA(4) | Prefix(2), "decoder.cross_attn": DoRA(2) | Prefix(3) | Adapter(4),
              "encoder.layers.1.ffn": Adapter(4, placement="parallel"), "ffn": HyperAdapter(4, task_dim=8, hidden=8),
              "embed": PromptTuning(3)}


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, VOCAB, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding in the second row
    return ids, mask, torch.randint(2, VOCAB, (2, 4), generator=g)


def logits(model, batch, **kw):
    ids, mask, target = batch
    return model(input_ids=ids, attention_mask=mask, decoder_input_ids=target, **kw).logits


@pytest.mark.parametrize("name", MODELS)
def test_towers_are_found_with_their_cross_attention(name):
    sites, n = SiteMap(MODELS[name]()), DECODER_LAYERS[name]
    assert [(s.name, len(s.layers), s.offset) for s in sites.towers] == [("encoder", 2, 0), ("decoder", n, 2)]
    assert sites.towers[0].arch.cross is None and sites.towers[1].arch.cross is not None
    rows = {row[0]: row for row in sites.table()}
    assert {"encoder.attn", "decoder.attn.o", "decoder.cross_attn.q", "decoder.ffn.down"} <= set(rows)
    assert "encoder.cross_attn" not in rows and rows["decoder.cross_attn"][2] == n


@pytest.mark.parametrize("name", MODELS)
def test_selectors_name_the_tower_and_default_to_every_tower_that_has_the_site(name):
    sites, n = SiteMap(MODELS[name]()), DECODER_LAYERS[name]
    keys = [p.key for p in sites.resolve("attn.q", PROJECTION, "LoRA")]
    assert keys == [f"encoder:layers:{i}:attn:q" for i in range(2)] + [f"decoder:layers:{i}:attn:q" for i in range(n)]
    (point,) = sites.resolve("encoder.layers.1.attn.v", PROJECTION, "LoRA")
    assert point.key == "encoder:layers:1:attn:v" and point.site == "encoder.attn.v" and point.depth == 1
    cross = sites.resolve("cross_attn", SUBLAYER, "Adapter")
    assert [p.key for p in cross] == [f"decoder:layers:{i}:cross_attn" for i in range(n)]
    assert [p.depth for p in cross] == list(range(2, 2 + n)) and {p.position for p in cross} == {CROSS_SUBLAYER}
    names = {id(m): n for n, m in sites.model.named_modules()}
    assert all(("EncDecAttention" in names[id(p.module)]) or ("encoder_attn" in names[id(p.module)]) for p in cross)
    assert len(sites.resolve("layers.0-1.ffn", SUBLAYER, "Adapter")) == 4  # the range in each tower


@pytest.mark.parametrize("selector, error, words", [
    ("encoder.cross_attn", SiteError, ["its encoder has no cross-attention"]),
    ("decoder.layers.3.attn", SiteError, ["out of range", "its decoder has 3 layers (0-2)"]),
    ("decoder.embed", SiteError, ["'embed' has no layers or tower"]),
    ("middle.attn", SiteError, ["unknown site", "encoder.<site>, decoder.<site>"]),
    ("embed", BindError, ["shared with", "embed_tokens", "name the one to adapt by path"]),
])
def test_bad_tower_selectors_say_what_is_valid(selector, error, words):
    with pytest.raises(error) as err:
        attach(bart(), {selector: LoRA(2)})
    assert all(w in str(err.value) for w in words), str(err.value)


def test_lora_binds_to_the_embedding_a_tower_looks_up(batch):
    model = bart()
    with torch.no_grad():
        before = logits(model, batch)
    adaptation = attach(model, {"model.encoder.embed_tokens": LoRA(2)})
    perturb(adaptation, std=0.5)
    with torch.no_grad():
        assert (logits(model, batch) - before).abs().max() > 1e-3


def test_a_tower_on_a_one_tower_model_is_refused_clearly():
    model = T.BertModel(T.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, vocab_size=VOCAB))
    with pytest.raises(SiteError, match="this model has one; write 'attn'"):
        attach(model, {"encoder.attn": LoRA(2)})
    with pytest.raises(SiteError, match="this model has no cross-attention"):
        attach(model, {"cross_attn": LoRA(2)})


@pytest.mark.parametrize("name", MODELS)
def test_every_component_kind_trains_and_generate_is_the_same_with_and_without_cache(name, batch):
    model = MODELS[name]()
    adaptation = attach(model, EVERY_KIND)
    perturb(adaptation, std=0.05)
    ids, mask, target = batch
    out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=target, labels=target)
    out.loss.backward()
    trained = [(n, p) for n, p in adaptation.named_parameters() if p.requires_grad]
    assert trained
    for n, p in trained:  # every component's every parameter gets a real gradient: none cut off, none zero
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("adaptune."))
    with torch.no_grad():
        cached = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, use_cache=True)
        plain = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)
    detach(model)


@pytest.mark.parametrize("name", MODELS)
def test_the_prompt_goes_in_front_of_the_encoder_input_only(name, batch):
    """Prompted model == the base model run on [prompt; embeddings] with the mask widened, through the
    model's forward and through the encoder alone (as generate runs it)."""
    ids, mask, target = batch
    model = MODELS[name]()
    prompt = attach(model, {"embed": PromptTuning(3)})
    perturb(prompt, std=0.5)
    with torch.no_grad():
        rows = next(iter(prompt.parameters())).detach().clone()  # (3, d)
        prompted = logits(model, batch)
        encoded = model.get_encoder()(input_ids=ids, attention_mask=mask)
        stepwise = model(encoder_outputs=encoded, attention_mask=mask, decoder_input_ids=target).logits
        detach(model)
        embeds = model.get_input_embeddings()(ids)
        front = torch.cat([rows.expand(2, -1, -1), embeds], dim=1)
        wide = torch.cat([torch.ones(2, 3, dtype=mask.dtype), mask], dim=1)
        expected = model(inputs_embeds=front, attention_mask=wide, decoder_input_ids=target).logits
    assert encoded[0].shape[1] == 3 + ids.shape[1]
    torch.testing.assert_close(prompted, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(stepwise, expected, atol=1e-5, rtol=0)


def test_hypernetwork_adapters_tell_every_layer_and_cross_attention_apart():
    model = bart()
    adaptation = attach(model, {"attn": HyperAdapter(4, task_dim=8, hidden=8),
                                "cross_attn": HyperAdapter(4, task_dim=8, hidden=8)})
    (net,) = [m for m in adaptation.modules() if type(m).__name__ == "HyperNetwork"]
    assert net.layer.num_embeddings == 2 + 3 + 1 and net.position.num_embeddings == 4
    ids = {(b.module.layer, b.module.position) for b in adaptation.bindings()}
    assert len(ids) == 2 + 3 + 3


@pytest.mark.parametrize("name", MODELS)
def test_save_load_and_peft_format_round_trip(name, batch, tmp_path):
    model = MODELS[name]()
    adaptation = attach(model, {"encoder.attn": LoRA(4, alpha=8), "decoder.cross_attn.v": LoRA(2),
                                "decoder.layers.1.ffn": LoRA(3)})
    perturb(adaptation, std=0.2)
    with torch.no_grad():
        expected = logits(model, batch)
    save(model, tmp_path / "a.safetensors")
    export_peft(model, tmp_path / "peft")
    fresh = MODELS[name]()
    load(fresh, tmp_path / "a.safetensors")
    imported = MODELS[name]()
    import_peft(imported, tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(MODELS[name](), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        for other in (fresh, imported, theirs):
            torch.testing.assert_close(logits(other, batch), expected, atol=1e-5, rtol=0)


def test_a_gated_t5_feed_forward_has_its_gate():
    torch.manual_seed(0)
    model = T.T5ForConditionalGeneration(T.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                                    vocab_size=VOCAB, feed_forward_proj="gated-gelu"))
    sites = SiteMap(model)
    (gate,) = sites.resolve("encoder.layers.0.ffn.gate", PROJECTION, "LoRA")
    up, down = sites.resolve("decoder.layers.1.ffn", PROJECTION, "LoRA")
    ffn = model.decoder.block[1].layer[2].DenseReluDense
    assert gate.module is model.encoder.block[0].layer[1].DenseReluDense.wi_0
    assert up.module is ffn.wi_1 and down.module is ffn.wo
