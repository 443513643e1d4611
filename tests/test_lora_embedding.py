"""LoRA on embedding tables ('embed' or an nn.Embedding path), as PEFT's lora.Embedding, both ways."""
import peft
import pytest
import torch
from helpers import assert_grads_on_components_only, bound, perturb, tiny_bert, tiny_gpt2, tiny_llama, VOCAB
from safetensors.torch import load_file, save_file
from test_merge import same_state, snapshot
from test_peft_format import ATOL, assert_untouched, every_output, load_peft, randomize_peft
from test_peft_options import specs_of
from torch import nn

import adaptune
from adaptune import BindError, BitFit, DoRA, LoadError, LoRA, MergeError, attach
from adaptune.peft_export import WEIGHTS_NAME, export_peft
from adaptune.peft_import import import_peft


def untied_llama():
    return tiny_llama(tie_word_embeddings=False)


BUILDS = {"gpt2": tiny_gpt2, "bert": tiny_bert, "llama": untied_llama}
TABLES = {"gpt2": "transformer.wte", "bert": "embeddings.word_embeddings", "llama": "model.embed_tokens"}
QUERY = {"gpt2": "c_attn", "bert": "query", "llama": "q_proj"}
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # PEFT warns about targeted (tied) embeddings


@pytest.mark.parametrize("name", BUILDS)
def test_fresh_lora_on_embed_is_the_identity_with_peft_init(name, ids):
    model = BUILDS[name]()
    before = every_output(model, ids)
    a = attach(model, {"embed": LoRA(4, alpha=8)})
    (m,) = bound(a, "embed")
    assert m.A.shape == (4, VOCAB) and m.B.shape == (32, 4)  # PEFT's (r, num_embeddings), (dim, r)
    assert m.A.abs().max() == 0 and m.B.abs().min() > 0  # A zeros, B normal
    torch.testing.assert_close(every_output(model, ids), before, atol=0, rtol=0)


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_export_matches_peft_and_round_trips(name, rslora, ids, tmp_path):
    build = BUILDS[name]
    model = build()
    base = every_output(model, ids)
    perturb(attach(model, {"embed": LoRA(4, alpha=8, rslora=rslora), "attn.q": LoRA(2, rslora=rslora)}), std=0.3)
    expected = every_output(model, ids)
    assert (expected - base).abs().max() > 1e-2
    export_peft(model, tmp_path)
    key = "base_model.model." + TABLES[name]
    saved = load_file(str(tmp_path / WEIGHTS_NAME))
    assert saved[key + ".lora_embedding_A"].shape == (4, VOCAB) and saved[key + ".lora_embedding_B"].shape == (32, 4)
    torch.testing.assert_close(every_output(load_peft(build, tmp_path), ids), expected, atol=ATOL, rtol=0)
    fresh = build()
    import_peft(fresh, tmp_path)
    torch.testing.assert_close(every_output(fresh, ids), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("name", BUILDS)
def test_import_matches_peft(name, rslora, ids, tmp_path):
    build = BUILDS[name]
    table = TABLES[name].rsplit(".", 1)[1]
    config = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=rslora, lora_dropout=0.1,
                             target_modules=[table, QUERY[name]], fan_in_fan_out=name == "gpt2")
    peft_model = peft.get_peft_model(build(), config).eval()
    randomize_peft(peft_model)
    expected = every_output(peft_model, ids)
    peft_model.save_pretrained(str(tmp_path))  # llama: with a copy of embed_tokens' base weights
    model = build()
    assert (expected - every_output(model, ids)).abs().max() > 1e-2
    a = import_peft(model, tmp_path)
    torch.testing.assert_close(every_output(model, ids), expected, atol=ATOL, rtol=0)
    assert specs_of(a)[TABLES[name]] == LoRA(4, alpha=8, rslora=rslora)  # PEFT applies no dropout to ids


def test_import_refuses_a_base_copy_that_differs_from_the_model(ids, tmp_path):
    peft_model = peft.get_peft_model(untied_llama(), peft.LoraConfig(r=4, target_modules=["embed_tokens"]))
    peft_model.save_pretrained(str(tmp_path))
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    assert key in tensors  # PEFT's save_embedding_layers
    tensors[key] = tensors[key] + 1
    save_file(tensors, str(tmp_path / WEIGHTS_NAME))
    model = untied_llama()
    before = every_output(model, ids)
    with pytest.raises(LoadError, match="base_layer.weight .*differs from model.embed_tokens.weight"):
        import_peft(model, tmp_path)
    assert_untouched(model, before, ids)


def test_a_scaled_embedding_matches_peft():
    class Scaled(nn.Embedding):  # as Gemma's scaled word embedding
        embed_scale = 3.0

        def forward(self, x):
            return super().forward(x) * self.embed_scale

    def build():
        torch.manual_seed(0)
        return nn.Sequential(Scaled(VOCAB, 16, padding_idx=0), nn.Linear(16, 8))

    peft_model = peft.get_peft_model(build(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    randomize_peft(peft_model)
    model = build()
    (m,) = bound(attach(model, {"0": LoRA(4, alpha=8)}), "0")
    with torch.no_grad():
        m.A.copy_(peft_model.base_model.model[0].lora_embedding_A["default"])
        m.B.copy_(peft_model.base_model.model[0].lora_embedding_B["default"])
    ids = torch.tensor([[0, 5, 7, 95]])
    torch.testing.assert_close(model(ids), peft_model(ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name, selector", [("bert", "embed"), ("llama", "model.embed_tokens")])
def test_merge_and_unmerge_an_untied_table_bit_exact(name, selector, ids):
    model = BUILDS[name]()
    base = snapshot(model)
    a = attach(model, {selector: LoRA(4, alpha=8, rslora=True), "attn": LoRA(2)})
    perturb(a, std=0.3)
    unmerged = every_output(model, ids)
    a.merge()
    assert not torch.equal(model.get_input_embeddings().weight, base[TABLES[name] + ".weight"])
    torch.testing.assert_close(every_output(model, ids), unmerged, atol=1e-4, rtol=1e-4)
    a.unmerge()
    assert same_state(model, {**base, **{k: v for k, v in model.state_dict().items() if k.startswith("adaptune.")}})
    torch.testing.assert_close(every_output(model, ids), unmerged, atol=0, rtol=0)


def test_merge_is_refused_on_a_tied_table_but_its_forward_works(ids):
    model = tiny_gpt2()  # wte is tied to lm_head
    base, state = every_output(model, ids), snapshot(model)
    a = attach(model, {"embed": LoRA(4)})
    perturb(a, std=0.3)
    with pytest.raises(MergeError, match="tied to lm_head.*nothing was merged"):
        a.merge()
    assert not a.merged and (every_output(model, ids) - base).abs().max() > 1e-2
    a.detach()
    assert same_state(model, state)


def test_save_and_load_round_trip(ids, tmp_path):
    model = untied_llama()
    a = attach(model, {"embed": LoRA(4, alpha=8, rslora=True), "ffn": LoRA(2)})
    perturb(a, std=0.3)
    expected = every_output(model, ids)
    a.save(tmp_path / "a.safetensors")
    fresh = untied_llama()
    adaptune.load(fresh, tmp_path / "a.safetensors")
    torch.testing.assert_close(every_output(fresh, ids), expected, atol=0, rtol=0)


def test_training_gives_gradients_to_a_and_b_only_and_none_to_the_padding_row():
    model = tiny_bert()  # word_embeddings has padding_idx 0
    base_names = {n for n, _ in model.named_parameters()}
    a = attach(model, {"embed": LoRA(4)})
    model.train()
    (m,) = bound(a, "embed")
    with torch.no_grad():
        m.A.normal_()  # so B gets a gradient too
    ids = torch.tensor([[0, 3, 5, 7, 0]])
    model(ids).last_hidden_state.square().sum().backward()
    assert_grads_on_components_only(model, base_names)
    assert m.A.grad[:, 0].abs().max() == 0 and m.A.grad[:, 3].abs().max() > 0  # as F.embedding's padding_idx


@pytest.mark.parametrize("component, words", [
    (DoRA(4), ["DoRA(r=4", "cannot bind to 'embed'", "use LoRA on embeddings", "attn.q|k|v|o"]),
    (BitFit(), ["BitFit()", "cannot bind to 'embed'", "no bias", "Linear/Conv1D module path"]),
    (LoRA(4, dropout=0.1), ["dropout does not apply to an embedding", "dropout=0.0"]),
    (LoRA(4, init="pissa"), ["init='pissa' does not apply to an embedding", "init='default'"]),
])
def test_what_cannot_bind_to_a_table_says_what_can(component, words):
    model = tiny_gpt2()
    with pytest.raises(BindError) as err:
        attach(model, {"embed": component})
    for word in words:
        assert word in str(err.value), (word, str(err.value))
    assert not hasattr(model, "adaptune") and "forward" not in model.transformer.wte.__dict__


def test_importing_peft_dora_on_an_embedding_is_refused(ids, tmp_path):
    config = peft.LoraConfig(r=4, use_dora=True, target_modules=["wte", "c_attn"], fan_in_fan_out=True)
    peft.get_peft_model(tiny_gpt2(), config).save_pretrained(str(tmp_path))
    model = tiny_gpt2()
    before = every_output(model, ids)
    with pytest.raises(LoadError, match="DoRA on an embedding table"):
        import_peft(model, tmp_path)
    assert_untouched(model, before, ids)
