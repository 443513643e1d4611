"""Named sites on architectures without an exact map, found by structure: tiny random configs, every
component kind where the model has the site, forward + backward, cached generate == uncached."""
import pytest
import torch
import transformers as T

from adaptune import Adapter, BindError, DoRA, LoRA, Prefix, PromptTuning, attach, detach
from adaptune.sites import SiteMap
from helpers import VOCAB

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB,
             pad_token_id=0, bos_token_id=0, eos_token_id=1)
LLAMA_LIKE = dict(SMALL, num_key_value_heads=2, head_dim=8)

ARCHS = {  # name: (config, model class, generates)
    "xlm-roberta": (T.XLMRobertaConfig(**SMALL), T.XLMRobertaModel, False),
    "distilbert": (T.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=VOCAB, pad_token_id=0),
                   T.DistilBertModel, False),
    "qwen3": (T.Qwen3Config(**LLAMA_LIKE), T.Qwen3ForCausalLM, True),
    "gemma": (T.GemmaConfig(**LLAMA_LIKE), T.GemmaForCausalLM, True),
    "gemma2": (T.Gemma2Config(**LLAMA_LIKE), T.Gemma2ForCausalLM, True),
    "phi3": (T.Phi3Config(**dict(SMALL, num_key_value_heads=2)), T.Phi3ForCausalLM, True),
    "opt": (T.OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, vocab_size=VOCAB,
                        word_embed_proj_dim=32, pad_token_id=0, bos_token_id=0, eos_token_id=1),
            T.OPTForCausalLM, True),
    "gpt-neox": (T.GPTNeoXConfig(**SMALL), T.GPTNeoXForCausalLM, True),
    "falcon": (T.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
                              pad_token_id=0, bos_token_id=0, eos_token_id=1), T.FalconForCausalLM, True),
    "mixtral": (T.MixtralConfig(**dict(SMALL, num_key_value_heads=2, num_local_experts=2)), T.MixtralForCausalLM,
                True),
}


def build(name):
    config, cls, generates = ARCHS[name]
    torch.manual_seed(0)
    model = cls(config).eval()
    try:
        model.set_attn_implementation("sdpa")
    except ValueError:  # Gemma2: eager only
        model.set_attn_implementation("eager")
    return model, generates


def loss(model, ids):
    out = model(input_ids=ids)
    h = out.logits if hasattr(out, "logits") else out.last_hidden_state
    return h.float().pow(2).mean()


@pytest.mark.parametrize("name", ARCHS)
def test_named_sites_are_found_and_every_component_trains(name):
    model, generates = build(name)
    sites = SiteMap(model)
    assert sites.arch is not None and sites.arch.name.startswith("found:"), sites.why_not
    assert sites.n_layers == 2 and {row[0] for row in sites.table()} >= {"attn", "attn.o"}
    ffn = {"ffn": Adapter(8)} if name != "mixtral" else {}
    prefix = Prefix(2) if name != "falcon" else Adapter(4)  # Falcon's attention names its implementations
    spec = {"attn": LoRA(4) | prefix, "layers.1.attn": Adapter(4, placement="parallel"), **ffn,
            "embed": PromptTuning(2)}
    ids = torch.randint(2, VOCAB, (2, 6))
    adaptation = attach(model, spec)
    with torch.no_grad():
        for b in adaptation.bindings():
            for p in b.module.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    loss(model, ids).backward()
    trained = [(n, p) for n, p in adaptation.named_parameters() if p.requires_grad]
    assert trained
    for n, p in trained:  # every component's every parameter gets a real gradient: none cut off, none zero
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("adaptune."))
    detach(model)


@pytest.mark.parametrize("name", [n for n in ARCHS if ARCHS[n][2]])
def test_cached_generate_equals_uncached_decoding(name):
    model, _ = build(name)
    attach(model, {"attn": LoRA(4) | (Prefix(2) if name != "falcon" else Adapter(4))})
    with torch.no_grad():
        for p in model.adaptune.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ids = torch.randint(2, VOCAB, (1, 5))
    cached = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=True)
    plain = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)


@pytest.mark.parametrize("name", ["phi3", "gpt-neox", "falcon"])
def test_a_fused_qkv_projection_is_adapted_whole(name):
    model, _ = build(name)
    with pytest.raises(BindError, match="one fused projection"):
        attach(model, {"attn.q": LoRA(4)})
    (point,) = SiteMap(model).resolve("layers.0.attn", "projection", "LoRA")
    assert point.rows is None and point.site == "attn.qkv"
    attach(model, {"attn": DoRA(4)})


def test_experts_are_refused_clearly_and_attention_still_binds():
    model, _ = build("mixtral")
    with pytest.raises(BindError, match="mixture of experts"):
        attach(model, {"ffn": LoRA(4)})
    attach(model, {"attn": LoRA(4), "attn.o": LoRA(2)})


def test_prefix_is_refused_on_attention_that_does_not_call_the_interface():
    model, _ = build("falcon")
    with pytest.raises(BindError, match="does not call transformers' attention interface"):
        attach(model, {"attn": Prefix(2)})


def test_gate_is_a_site_where_the_feed_forward_has_one():
    model, _ = build("qwen3")
    (gate,) = SiteMap(model).resolve("layers.0.ffn.gate", "projection", "LoRA")
    assert gate.module is model.model.layers[0].mlp.gate_proj
    model, _ = build("opt")
    with pytest.raises(BindError, match="no gate projection"):
        attach(model, {"ffn.gate": LoRA(4)})


@pytest.mark.parametrize("name", ["modernbert", "vit"])
def test_fused_and_vision_encoders_train_through_named_sites(name):
    torch.manual_seed(0)
    if name == "modernbert":
        model = T.ModernBertModel(T.ModernBertConfig(**SMALL, cls_token_id=0, sep_token_id=1,
                                                     global_attn_every_n_layers=1)).eval()
        inputs = {"input_ids": torch.randint(2, VOCAB, (2, 6))}
    else:
        model = T.ViTModel(T.ViTConfig(**{k: v for k, v in SMALL.items() if "token" not in k and k != "vocab_size"},
                                       image_size=32, patch_size=8)).eval()
        inputs = {"pixel_values": torch.randn(2, 3, 32, 32)}
    adaptation = attach(model, {"attn": LoRA(4), "attn.o": DoRA(2), "ffn": Adapter(4)})
    with torch.no_grad():
        for p in adaptation.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model(**inputs).last_hidden_state.pow(2).mean().backward()
    trained = [(n, p) for n, p in adaptation.named_parameters() if p.requires_grad]
    assert trained
    for n, p in trained:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
