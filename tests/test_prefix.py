"""Prefix tuning: equal to the base model run on a KV cache pre-filled with the prefixes."""
import pytest
import torch
from helpers import bound, cache_of, greedy, randomize, tiny_bert, tiny_gpt2, tiny_llama, VOCAB, with_cache
from transformers import DynamicCache

from adaptune import BindError, Prefix, attach, detach
from adaptune.hooks.attention import _HOOKS, ATTRIBUTE, _extend_mask

N, T = 3, 7


def padded():
    ids = torch.randint(2, VOCAB, (2, T), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, 5:] = 0  # right padding in row 1
    return ids, mask


def heads(model):
    h = model.config.num_attention_heads
    return h, model.config.hidden_size // h


def prefix_cache(model, ad, batch, groups=(None,)):
    """A DynamicCache holding, per layer, the prefixes of `groups` concatenated in order."""
    h, d = heads(model)
    cache = DynamicCache(config=model.config)
    for layer in range(model.config.num_hidden_layers):
        mods = [m for g in groups for m in bound(ad, "attn", layer, g)]
        keys = torch.cat([m.kv()[0] for m in mods]).view(-1, h, d).transpose(0, 1)  # (H, P, D)
        values = torch.cat([m.kv()[1] for m in mods]).view(-1, h, d).transpose(0, 1)
        cache.update(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1), layer)
    return cache


def reference(model, ad, ids, mask, groups=(None,)):
    """The base model on [prefix cache, ids]: mask widened by P ones, positions 0..T-1."""
    cache = prefix_cache(model, ad, ids.shape[0], groups)
    p = cache.get_seq_length()
    with ad.disabled():
        return model(ids, attention_mask=torch.cat([torch.ones(ids.shape[0], p, dtype=mask.dtype), mask], 1),
                     **with_cache(model, cache), position_ids=torch.arange(ids.shape[1]).expand(ids.shape[0], -1))


def build(kind, impl):
    model = {"gpt2": tiny_gpt2, "bert": tiny_bert, "llama": tiny_llama}[kind](attn_implementation=impl)
    randomize(model, std=0.3, seed=3)  # a base with non-trivial attention
    return model


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("hidden", [None, 16])
def test_equals_prefilled_cache(kind, impl, hidden):
    model = build(kind, impl)
    ids, mask = padded()
    with torch.no_grad():
        base = model(ids, attention_mask=mask)[0]
        ad = attach(model, {"attn": Prefix(N, hidden=hidden)})
        assert model.config._attn_implementation == "adaptune_" + impl
        randomize(ad, std=0.5)
        for m in (mask, None):  # a padded batch, and no mask (sdpa's implicit causal mask)
            got = model(ids, attention_mask=m)[0]
            want = reference(model, ad, ids, mask if m is not None else torch.ones_like(mask))[0]
            real = (m if m is not None else torch.ones_like(mask)).bool()
            torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got[mask.bool()], base[mask.bool()], atol=1e-3)  # the prefix acts


def test_shared_and_task_prefixes_concatenate():
    model = build("gpt2", "sdpa")
    ad = attach(model, {"attn": Prefix(2)}, tasks={"a": {"attn": Prefix(3)}, "b": {"layers.0.attn": Prefix(1)}})
    randomize(ad, std=0.5)
    ids, mask = padded()
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
        want = reference(model, ad, ids, mask, groups=(None, "a")).logits
        torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-5, atol=1e-5)
        ad.use(None)
        got = model(ids, attention_mask=mask).logits
        want = reference(model, ad, ids, mask, groups=(None,)).logits
        torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-5, atol=1e-5)


def test_hidden_is_li_liang_mlp_and_owns_the_parameters():
    model = build("bert", "sdpa")
    ad = attach(model, {"attn": Prefix(N, hidden=16)})
    enc = ad.shared.common["0"]
    names = sorted(n for n, _ in ad.named_parameters())
    assert names == sorted(f"shared.common.0.{n}" for n in ("embedding", "down.weight", "down.bias",
                                                             "up.weight", "up.bias"))
    assert sorted(ad.state_dict()) == names  # the per-layer modules hold no copies
    d, layers, kv = 32, 2, 32
    assert sum(p.numel() for p in ad.parameters()) == N * d + d * 16 + 16 + 16 * layers * 2 * kv + layers * 2 * kv
    randomize(ad, std=0.3)
    with torch.no_grad():
        full = torch.tanh(enc.embedding @ enc.down.weight.T + enc.down.bias) @ enc.up.weight.T + enc.up.bias
        for layer in range(layers):
            keys, values = bound(ad, "attn", layer)[0].kv()
            torch.testing.assert_close(keys, full[:, 2 * kv * layer:2 * kv * layer + kv])
            torch.testing.assert_close(values, full[:, 2 * kv * layer + kv:2 * kv * (layer + 1)])


@pytest.mark.parametrize("hidden", [None, 8])
def test_gradients_reach_only_the_prefix(hidden):
    model = build("gpt2", "sdpa")
    ad = attach(model, {"attn": Prefix(N, hidden=hidden)})
    ids, mask = padded()
    model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    own = {id(p) for p in ad.parameters()}
    assert own and all(p.grad is not None and p.grad.abs().sum() > 0 for p in ad.parameters())
    assert all(p.grad is None for p in model.parameters() if id(p) not in own)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_generate_matches_uncached_greedy(kind, impl):
    model = build(kind, impl)
    model.generation_config.eos_token_id = None  # run every step
    ad = attach(model, {"attn": Prefix(4)})
    randomize(ad, std=0.5, seed=2)
    ids, mask = padded()
    ids, mask = ids.flip(1), mask.flip(1)  # left padding, as for generation
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=1,
                             output_logits=True, return_dict_in_generate=True)
        assert torch.equal(out.sequences, greedy(model, ids, mask, 6))
        seq, full = out.sequences, torch.cat([mask, torch.ones(2, 6, dtype=mask.dtype)], 1)
        logits = model(seq, attention_mask=full, position_ids=(full.cumsum(-1) - 1).clamp(min=0)).logits
        for i, step in enumerate(out.logits):
            torch.testing.assert_close(step, logits[:, T - 1 + i], rtol=1e-4, atol=1e-4)
        with ad.disabled():
            assert not torch.equal(out.sequences, greedy(model, ids, mask, 6))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_chunked_forward_with_cache_equals_one_pass(kind):
    model = build(kind, "sdpa")
    ad = attach(model, {"attn": Prefix(N)})
    randomize(ad, std=0.5)
    ids, _ = padded()
    with torch.no_grad():
        full = model(ids).logits
        first = model(ids[:, :4], use_cache=True)
        assert cache_of(first).get_seq_length() == 4  # prefixes stay out of the cache
        rest = model(ids[:, 4:], **with_cache(model, cache_of(first))).logits
    torch.testing.assert_close(torch.cat([first.logits, rest], 1), full, rtol=1e-5, atol=1e-5)


def test_implicit_causal_mask_is_aligned_bottom_right():
    module = torch.nn.Module()
    module.is_causal = True
    q, k = torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 3, 4)  # T_q = 2 queries, the last of T_k = 3 keys
    want = torch.tensor([[True, True, True, True, False], [True, True, True, True, True]])  # 2 prefix columns
    assert torch.equal(_extend_mask(None, module, q, k, 2, None, "sdpa")[0, 0], want)
    eager = _extend_mask(None, module, q, k, 2, None, "eager")[0, 0]
    assert torch.equal(eager == 0, want) and (eager[~want] == torch.finfo(q.dtype).min).all()
    assert _extend_mask(None, module, q[:, :, :1], k, 2, None, "sdpa") is None  # one query sees all
    module.is_causal = False
    assert _extend_mask(None, module, q, k, 2, None, "sdpa") is None
    padded_mask = torch.tensor([[[[0.0, -1e9, 0.0]]]]).expand(1, 1, 2, 3)  # additive mask keeps its values
    assert torch.equal(_extend_mask(padded_mask, module, q, k, 2, None, "eager")[0, 0, 0],
                       torch.tensor([0.0, 0.0, 0.0, -1e9, 0.0]))


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_detach_restores_model_and_config(kind):
    model = build(kind, "sdpa")
    ids, mask = padded()
    with torch.no_grad():
        before = model(ids, attention_mask=mask)[0]
        ad = attach(model, {"attn": Prefix(N), "layers.1.attn": Prefix(2, hidden=4)})
        randomize(ad)
        assert not torch.equal(model(ids, attention_mask=mask)[0], before)
        detach(model)
        assert torch.equal(model(ids, attention_mask=mask)[0], before)
    assert model.config._attn_implementation == "sdpa"
    assert not hasattr(model, "adaptune")
    assert not any(m in _HOOKS or ATTRIBUTE in vars(m) for m in model.modules())


def test_bind_errors_leave_the_model_unchanged():
    model = tiny_gpt2()
    with pytest.raises(BindError, match="binds to attn"):
        attach(model, {"ffn": Prefix(4)})
    model.config._attn_implementation_internal = "flex_attention"
    with pytest.raises(BindError, match="'eager', 'sdpa'"):
        attach(model, {"attn": Prefix(4)})
    assert model.config._attn_implementation == "flex_attention" and not hasattr(model, "adaptune")
