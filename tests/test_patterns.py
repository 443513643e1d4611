"""Raw module paths with patterns, for every component kind."""
import pytest
import torch

from adaptune import Adapter, LoRA, Prefix, PromptTuning, SiteError, attach
from helpers import VOCAB, tiny_llama


def test_a_star_stands_for_one_path_part():
    model = tiny_llama()
    adaptation = attach(model, {"model.layers.*.mlp.gate_proj": LoRA(2)})
    assert [b.point.module for b in adaptation.bindings()] == [layer.mlp.gate_proj for layer in model.model.layers]


def test_a_regex_must_match_whole_paths():
    model = tiny_llama()
    adaptation = attach(model, {r"re:model\.layers\.1\.self_attn\.[qv]_proj": LoRA(2)})
    layer = model.model.layers[1].self_attn
    assert [b.point.module for b in adaptation.bindings()] == [layer.q_proj, layer.v_proj]


def test_prefix_and_prompt_bind_to_module_paths_like_their_named_sites():
    ids = torch.randint(2, VOCAB, (1, 5))
    outputs = []
    for spec in ({"attn": Prefix(2), "embed": PromptTuning(2)},
                 {"model.layers.*.self_attn": Prefix(2), "model.embed_tokens": PromptTuning(2)}):
        model = tiny_llama()
        model.set_attn_implementation("sdpa")
        adaptation = attach(model, spec)
        torch.manual_seed(1)
        with torch.no_grad():
            for p in adaptation.parameters():
                p.copy_(torch.randn_like(p) * 0.1)
        with torch.no_grad():
            outputs.append(model(input_ids=ids).logits)
    torch.testing.assert_close(outputs[0], outputs[1])
    assert outputs[0].shape[1] == 2 + 5  # the prompt's positions come first


@pytest.mark.parametrize("spec, error, words", [
    ({"model.layers.*.mlp.nope": LoRA(2)}, SiteError, "matches no module"),
    ({"re:model.layers.(": LoRA(2)}, SiteError, "bad regular expression"),
    ({"model.layers.*.mlp": LoRA(2)}, Exception, "not a Linear or Conv1D"),
    ({"model.norm": PromptTuning(2)}, Exception, "not an nn.Embedding"),
    ({"model.layers.*.mlp.up_proj": Prefix(2)}, Exception, "has no `config`"),
    ({"model.layers.*.mlp.up_proj": Adapter(4)}, None, None),
])
def test_patterns_that_match_nothing_or_the_wrong_module_are_refused(spec, error, words):
    model = tiny_llama()
    if error is None:
        assert len(list(attach(model, spec).bindings())) == 2
        return
    with pytest.raises(error, match=words):
        attach(model, spec)
    assert not hasattr(model, "adaptune")
