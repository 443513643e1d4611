"""Prompt tuning: a prompt initialised from token ids t acts exactly like t prepended to the input."""
import inspect

import pytest
import torch
from helpers import bound, cache_of, greedy, randomize, tiny_bert, tiny_gpt2, tiny_llama, VOCAB, with_cache

from adaptune import AdaptuneError, BindError, ConfigError, PromptTuning, Stack, attach, detach

T = 6
PROMPT = (5, 17, 42)
P = len(PROMPT)


def batch():
    ids = torch.randint(2, VOCAB, (2, T), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, 4:] = 0  # right padding in row 1
    return ids, mask


def prepend(x, values):
    return torch.cat([torch.tensor(values, dtype=x.dtype).expand(x.shape[0], -1), x], 1)


def gpt2(kind="gpt2"):
    model = {"gpt2": tiny_gpt2, "llama": tiny_llama}[kind]()
    randomize(model, std=0.3, seed=3)
    return model


def test_gpt2_prompt_from_ids_equals_prepended_ids():
    model = gpt2()
    ids, mask = batch()
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        want = model(prepend(ids, PROMPT), attention_mask=prepend(mask, (1,) * P),
                     labels=prepend(labels, (-100,) * P))
        attach(model, {"embed": PromptTuning(P, token_ids=PROMPT)})
        got = model(ids, attention_mask=mask, labels=labels)
        names = list(inspect.signature(model.forward).parameters)
        args = [ids] + [None] * (names.index("attention_mask") - 1) + [mask]
        positional = model(*args).logits  # positional arguments are bound by name
    assert got.logits.shape == (2, P + T, VOCAB)  # outputs include the virtual positions
    real = mask.bool()
    torch.testing.assert_close(got.logits[:, P:][real], want.logits[:, P:][real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(positional, got.logits)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_bert_prompt_from_ids_equals_prepended_ids(impl):
    model = tiny_bert(attn_implementation=impl)
    randomize(model, std=0.3, seed=3)
    ids, mask = batch()
    types = torch.ones_like(ids)  # the prompt's token types are zeros
    pos = torch.arange(T).expand(2, -1)
    with torch.no_grad():
        want = model(prepend(ids, PROMPT), attention_mask=prepend(mask, (1,) * P),
                     token_type_ids=prepend(types, (0,) * P)).last_hidden_state
        want_pos = model(prepend(ids, PROMPT), attention_mask=prepend(mask, (1,) * P),
                         position_ids=prepend(pos + P, tuple(range(P)))).last_hidden_state
        attach(model, {"embed": PromptTuning(P, token_ids=PROMPT)})
        got = model(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        got_pos = model(ids, attention_mask=mask, position_ids=pos).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(got[:, P:][real], want[:, P:][real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_pos[:, P:][real], want_pos[:, P:][real], rtol=1e-5, atol=1e-5)


def test_shared_and_task_prompts_concatenate():
    model = gpt2()
    ids, _ = batch()
    with torch.no_grad():
        want = model(prepend(ids, PROMPT + (9, 8))).logits
        want_shared = model(prepend(ids, PROMPT)).logits
        ad = attach(model, {"embed": PromptTuning(P, token_ids=PROMPT)},
                    tasks={"a": {"embed": PromptTuning(2, token_ids=(9, 8))}})
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)
        ad.use(None)
        torch.testing.assert_close(model(ids).logits, want_shared, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("padding", [False, True])
def test_generate_matches_uncached_greedy(kind, padding):
    model = gpt2(kind)
    model.generation_config.eos_token_id = None  # run every step
    ad = attach(model, {"embed": PromptTuning(4)})
    randomize(ad, std=1.0, seed=4)
    ids, mask = batch()
    ids, mask = ids.flip(1), (mask.flip(1) if padding else torch.ones_like(mask))  # left padding
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=1,
                             output_logits=True, return_dict_in_generate=True)
        assert torch.equal(out.sequences, greedy(model, ids, mask, 6))
        full = torch.cat([mask, torch.ones(2, 6, dtype=mask.dtype)], 1)
        logits = model(out.sequences, attention_mask=full,
                       position_ids=(full.cumsum(-1) - 1).clamp(min=0)).logits  # (B, 4 + T + 6, V)
        for i, step in enumerate(out.logits):
            torch.testing.assert_close(step, logits[:, 4 + T - 1 + i], rtol=1e-4, atol=1e-4)
        with ad.disabled():
            assert not torch.equal(out.sequences, greedy(model, ids, mask, 6))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_chunked_forward_with_cache_equals_one_pass(kind):
    """A forward continued from the cache of the first chunk: the prompt comes from the cache, not again."""
    model = gpt2(kind)
    ad = attach(model, {"embed": PromptTuning(4)})
    randomize(ad, std=1.0, seed=4)
    ids, _ = batch()
    with torch.no_grad():
        full = model(ids).logits  # (B, 4 + T, V)
        first = model(ids[:, :3], use_cache=True)
        assert cache_of(first).get_seq_length() == 4 + 3  # the prompt is in the cache
        rest = model(ids[:, 3:], **with_cache(model, cache_of(first))).logits
    assert rest.shape[1] == T - 3
    torch.testing.assert_close(torch.cat([first.logits, rest], 1), full, rtol=1e-5, atol=1e-5)


def test_ambiguous_and_unknown_caches():
    model = gpt2()
    attach(model, {"embed": PromptTuning(4)})
    ids, _ = batch()
    with torch.no_grad():
        first = model(ids[:, :3], use_cache=True)
        with pytest.raises(AdaptuneError, match="more than one KV cache"):
            model(ids[:, 3:], **with_cache(model, cache_of(first)), cache_params=cache_of(first))
        with pytest.raises(AdaptuneError, match="cannot tell how many positions"):
            model(ids[:, 3:], **with_cache(model, object()))


def test_gradients_reach_only_the_prompt():
    model = gpt2()
    ad = attach(model, {"embed": PromptTuning(4, init="normal")})
    ids, mask = batch()
    model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    (prompt,) = ad.parameters()
    assert prompt.shape == (4, 32) and prompt.grad is not None and prompt.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters() if p is not prompt)


def test_vocab_init_copies_embedding_rows():
    model = gpt2()
    ad = attach(model, {"embed": PromptTuning(5)})
    weight = model.get_input_embeddings().weight
    for row in bound(ad, "embed")[0].prompt:
        assert (weight == row).all(-1).any()


def test_detach_removes_the_hook_bit_exact():
    model = gpt2()
    ids, mask = batch()
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
        attach(model, {"embed": PromptTuning(3)})
        assert model(ids, attention_mask=mask).logits.shape[1] == 3 + T
        detach(model)
        assert torch.equal(model(ids, attention_mask=mask).logits, before)
    assert not model._forward_pre_hooks and not hasattr(model, "adaptune")


def test_errors():
    with pytest.raises(BindError, match="binds to embed"):
        attach(gpt2(), {"attn": PromptTuning(4)})
    with pytest.raises(ConfigError, match="n=2"):
        PromptTuning(3, token_ids=(1, 2))
    with pytest.raises(ConfigError, match="init must be one of"):
        PromptTuning(3, init="zeros")
    model = gpt2()
    with pytest.raises(BindError, match="out of range"):
        attach(model, {"embed": PromptTuning(2, token_ids=(1, VOCAB))})
    assert not hasattr(model, "adaptune") and not model._forward_pre_hooks


def test_spec_round_trips_through_json_data():
    stack = Stack(PromptTuning(2, token_ids=[3, 4]))
    data = stack.to_dict()
    assert data == [{"type": "PromptTuning", "n": 2, "init": "vocab", "token_ids": (3, 4)}]
    assert Stack.from_dict([{**data[0], "token_ids": [3, 4]}]) == stack  # JSON gives back a list
