"""LoRA: identity at init, the documented math, alpha scaling, dropout, gradients, parameter counts."""
import pytest
import torch

from adaptune import LoRA, attach
from helpers import assert_grads_on_components_only, bound, main_output, out, randomize, tiny_bert, tiny_gpt2


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_scale_is_alpha_over_r():
    assert LoRA(4).scale == 1.0 and LoRA(4, alpha=16).scale == 4.0 and LoRA(8, alpha=2.0).scale == 0.25


@pytest.mark.parametrize("selector", ["attn", "attn.o", "ffn", "layers.1.ffn.up"])
def test_fresh_lora_leaves_outputs_unchanged(model, ids, selector):
    before = out(model, ids)
    attach(model, {selector: LoRA(4)})
    torch.testing.assert_close(out(model, ids), before, rtol=0, atol=1e-5)


def test_randomised_lora_changes_outputs(model, ids):
    before = out(model, ids)
    randomize(attach(model, {"attn": LoRA(4)}))
    assert (out(model, ids) - before).abs().max() > 1e-3


def test_lora_on_gpt2_attn_equals_the_manual_computation_on_c_attn_slices():
    model = tiny_gpt2()
    c_attn = model.transformer.h[0].attn.c_attn
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    adaptation = attach(model, {"layers.0.attn": LoRA(4, alpha=2)})
    randomize(adaptation)
    q, k, v = bound(adaptation, "attn.q", 0)[0], bound(adaptation, "attn.k", 0)[0], \
        bound(adaptation, "attn.v", 0)[0]
    low = torch.cat([0.5 * (x @ m.A.T) @ m.B.T for m in (q, k, v)], dim=-1)  # (2, 5, 96)
    torch.testing.assert_close(c_attn(x), x @ c_attn.weight + c_attn.bias + low)


def test_lora_on_a_linear_equals_x_wt_plus_b_plus_scaled_low_rank():
    model = tiny_bert()
    query = model.encoder.layer[1].attention.self.query
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    adaptation = attach(model, {"layers.1.attn.q": LoRA(4, alpha=12)})
    randomize(adaptation)
    (lora,) = bound(adaptation, "attn.q", 1)
    expected = x @ query.weight.T + query.bias + 3.0 * (x @ lora.A.T) @ lora.B.T
    torch.testing.assert_close(query(x), expected)


def test_lora_factor_shapes_follow_the_projection():
    adaptation = attach(tiny_bert(), {"layers.0.ffn": LoRA(3)})
    up, down = bound(adaptation, "ffn.up", 0)[0], bound(adaptation, "ffn.down", 0)[0]
    assert up.A.shape == (3, 32) and up.B.shape == (64, 3)
    assert down.A.shape == (3, 64) and down.B.shape == (32, 3)
    assert torch.count_nonzero(up.B) == 0 and torch.count_nonzero(up.A) > 0


def test_dropout_is_active_only_in_training_mode():
    model = tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    query = model.encoder.layer[0].attention.self.query
    adaptation = attach(model, {"layers.0.attn.q": LoRA(4, dropout=0.5)})
    randomize(adaptation)
    (lora,) = bound(adaptation, "attn.q", 0)
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    plain = x @ query.weight.T + query.bias + (x @ lora.A.T) @ lora.B.T
    assert not model.training and not lora.training  # attach keeps the model's eval mode
    torch.testing.assert_close(query(x), plain)
    model.train()
    torch.manual_seed(5)
    dropped = query(x)
    torch.manual_seed(5)
    mask_x = torch.nn.functional.dropout(x, 0.5, True)
    torch.testing.assert_close(dropped, x @ query.weight.T + query.bias + (mask_x @ lora.A.T) @ lora.B.T)
    assert not torch.allclose(dropped, plain)
    model.eval()
    torch.testing.assert_close(query(x), plain)


def test_attach_to_a_model_in_training_mode_keeps_components_training():
    model = tiny_gpt2().train()
    adaptation = attach(model, {"attn": LoRA(2, dropout=0.1)})
    assert adaptation.training and all(m.training for m in adaptation.modules())


def test_gradients_reach_lora_parameters_only(model, ids):
    originally = {n for n, p in model.named_parameters()}
    adaptation = attach(model, {"attn": LoRA(4), "ffn": LoRA(2)})
    randomize(adaptation)
    main_output(model(ids)).pow(2).mean().backward()
    assert_grads_on_components_only(model, originally)


def test_lora_adds_r_times_in_plus_out_per_projection():
    r = 4
    gpt2 = tiny_gpt2(n_layer=3, n_embd=32)
    attach(gpt2, {"attn": LoRA(r), "layers.0.ffn": LoRA(r)})
    d, ff = 32, 4 * 32
    assert trainable(gpt2) == 3 * 3 * r * (d + d) + r * (d + ff) + r * (ff + d)
    bert = tiny_bert(layers=2, hidden=32)
    attach(bert, {"attn.v": LoRA(r), "ffn.down": LoRA(r)})
    assert trainable(bert) == 2 * r * (32 + 32) + 2 * r * (64 + 32)


def test_gpt2_generate_works_and_a_fresh_lora_keeps_its_tokens(ids):
    model = tiny_gpt2()
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=1)
    before = model.generate(ids[:1], **kw)
    attach(model, {"attn": LoRA(4), "ffn": LoRA(4)})
    assert torch.equal(model.generate(ids[:1], **kw), before)
