"""Prompt-based classification: templates, verbalizers, encoding (truncation keeps the template) and class scores
read at the answer position of masked (BERT) and causal (GPT-2, Llama) LMs, with and without logits_to_keep."""
import pytest
import torch

from adaptune import ConfigError, PromptTuning, attach
from adaptune.experiments.common.data import Example
from adaptune.experiments.common.training import Encoder, takes_logits_to_keep
from adaptune.experiments.fewshot import prompts
from adaptune.experiments.fewshot.prompts import TEMPLATES, Prompt, Template, Verbalizer, default_prompt

ONE = "<s1> It was [MASK] ."
PAIR = "<s1> ? [MASK] , <s2>"
SINGLES = [Example("A gripping, beautifully shot film about the sea.", None, 1.0),
           Example("Dull.", None, 0.0),
           Example("  The plot drags , but the cast is wonderful and the music too  ", None, 1.0)]
PAIRS = [Example("Is the sky blue?", "The sky is blue on clear days.", 0.0),
         Example("Who won?", "Nobody knows who won the match last night in the city.", 1.0)]


@pytest.fixture(scope="module")
def bert_tok():
    from transformers import AutoTokenizer

    from adaptune.models import minilm_path
    return AutoTokenizer.from_pretrained(str(minilm_path()))


@pytest.fixture(scope="module")
def bpe():
    from adaptune.experiments.common.causal import gpt2_bpe_tokenizer
    tok = gpt2_bpe_tokenizer()
    tok.pad_token = tok.eos_token
    return tok


def mlm():
    from transformers import BertConfig, BertForMaskedLM
    torch.manual_seed(0)
    return BertForMaskedLM(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=128)).eval()


def causal_lm(kind):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_layer=2, n_embd=32, n_head=4, n_positions=128)).eval()
    return LlamaForCausalLM(LlamaConfig(vocab_size=50257, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=64,
                                        max_position_embeddings=128)).eval()


class NoKeep(torch.nn.Module):
    """A model whose forward has no logits_to_keep: class_logits must index the full logits."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        kw = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, **kw)


def by_hand(rows, label_ids):
    """(B, V) logits at the answer -> (B, C): mean of each label's word logits."""
    return torch.stack([rows[:, list(ids)].mean(1) for ids in label_ids], 1)


def filled(template, e, upto_mask):
    text = template.replace("<s1>", e.a.strip()).replace("<s2>", (e.b or "").strip())
    return text[:text.index("[MASK]")].rstrip() if upto_mask else text


# --- templates and verbalizers ------------------------------------------------------------------------------------

def test_template_parts_and_slots():
    t = Template.parse(ONE)
    assert t.parts() == ["<s1>", " It was ", "[MASK]", " ."] and t.slots == 1
    p = Template.parse(PAIR)
    assert p.parts() == ["<s1>", " ? ", "[MASK]", " , ", "<s2>"] and p.slots == 2
    assert Template.parse("Q: <s1>[MASK]").parts() == ["Q: ", "<s1>", "[MASK]"]


@pytest.mark.parametrize("text, match", [
    ("", "non-empty string"), ("   ", "non-empty string"), (None, "non-empty string"), (3, "non-empty string"),
    ("It was [MASK] .", "has no <s1>"), ("<s2> It was [MASK] .", "<s2> but no <s1>"),
    ("<s1> <s1> [MASK]", "<s1> 2 times; each input slot appears at most once"),
    ("<s1> [MASK] <s2> <s2>", "<s2> 2 times"),
    ("<s1> It was .", "0 \\[MASK\\]; a template has exactly one answer slot"),
    ("<s1> [MASK] [MASK]", "2 \\[MASK\\]"),
    ("<s1> <s3> [MASK]", "unknown slot\\(s\\) <s3>; the input slots are <s1> and <s2>"),
    ("<sent> [MASK]", "unknown slot\\(s\\) <sent>"),
])
def test_bad_templates(text, match):
    with pytest.raises(ConfigError, match=match):
        Template.parse(text)


def test_verbalizer_parse():
    v = Verbalizer.parse("bad|awful, good|great", 2)
    assert v.words == (("bad", "awful"), ("good", "great"))
    assert Verbalizer.parse("terrible,bad,okay,good,great", 5).words[3] == ("good",)


@pytest.mark.parametrize("text, n, match", [
    ("terrible,great", 5, "gives 2 labels but the dataset has 5 classes; give 5 comma-separated"),
    ("bad,,great", 3, "label 1 has an empty word"), ("bad|,great", 2, "label 0 has an empty word"),
    ("bad,good|bad", 2, "'bad' is under labels 0 and 1"), ("bad|bad,good", 2, "label 0 twice"),
    ("very bad,good", 2, "'very bad' contains whitespace"), ("", 2, "non-empty string"),
])
def test_bad_verbalizers(text, n, match):
    with pytest.raises(ConfigError, match=match):
        Verbalizer.parse(text, n)


def test_default_prompts_build_for_both_lm_kinds(bert_tok, bpe):
    assert default_prompt("sst") == (ONE, "terrible,bad,okay,good,great")
    assert default_prompt("sst2") == default_prompt("sst-binary") == default_prompt("cfimdb")
    assert default_prompt("mnli") == (PAIR, "No,Yes,Maybe") and default_prompt("rte") == (PAIR, "Yes,No")
    for name in ("para", "qqp", "mrpc", "rte", "qnli", "mnli", "sst", "cola"):
        assert name in TEMPLATES
    for name, (template, verbalizer) in TEMPLATES.items():
        n = len(verbalizer.split(","))
        assert len(Prompt.build(template, verbalizer, bert_tok, False, n).label_ids) == n
        causal = default_prompt(name, causal=True)  # the pair templates put <s2> after [MASK]: a causal variant
        assert (causal == (template, verbalizer)) == (Template(template).slots == 1)
        assert len(causal[1].split(",")) == n
        assert len(Prompt.build(*causal, bpe, True, n).label_ids) == n
        if Template(template).slots == 2:
            with pytest.raises(ConfigError, match="after the answer slot"):
                Prompt.build(template, verbalizer, bpe, True, n)
    assert default_prompt("rte", causal=True)[1] == "True,False"  # label 0 = entailment
    with pytest.raises(ConfigError, match="no built-in prompt for dataset 'sts'; the datasets with one are .*mnli"):
        default_prompt("sts")


# --- label words --------------------------------------------------------------------------------------------------

def test_label_ids_masked_and_causal(bert_tok, bpe):
    p = Prompt.build(ONE, "bad|terrible,great", bert_tok, False, 2)
    assert p.label_ids == (tuple(bert_tok.convert_tokens_to_ids(["bad", "terrible"])),
                           (bert_tok.convert_tokens_to_ids("great"),))
    c = Prompt.build(ONE, "bad|terrible,great", bpe, True, 2)  # space before [MASK]: the answer is " great"
    assert c.label_ids == (tuple(bpe.convert_tokens_to_ids(["Ġbad", "Ġterrible"])),
                           (bpe.convert_tokens_to_ids("Ġgreat"),))
    glued = Prompt.build("<s1> It was:[MASK]", "bad,great", bpe, True, 2)  # no space: the bare word
    assert glued.label_ids == ((bpe.convert_tokens_to_ids("bad"),), (bpe.convert_tokens_to_ids("great"),))
    after_slot = Prompt.build("<s1>[MASK]", "bad,great", bpe, True, 2)  # the sentence is stripped: " great"
    assert after_slot.label_ids == ((bpe.convert_tokens_to_ids("Ġbad"),), (bpe.convert_tokens_to_ids("Ġgreat"),))


def test_label_word_errors(bert_tok, bpe):
    with pytest.raises(ConfigError, match=r"'zxqvbn'.*\['z', '##x', .*must be a single token.*pick another"):
        Prompt.build(ONE, "zxqvbn,great", bert_tok, False, 2)
    with pytest.raises(ConfigError, match=r"'terrible'.*\['ter', 'rible'\].*single token"):
        Prompt.build("<s1> It was:[MASK]", "terrible,great", bpe, True, 2)
    with pytest.raises(ConfigError, match="tokenizer has no mask token; a masked-LM template needs one; use a causal"):
        Prompt.build(ONE, "terrible,great", bpe, False, 2)
    with pytest.raises(ConfigError, match="'good' and 'Good' are the same token"):  # the MiniLM vocab is uncased
        Prompt.build(ONE, "good,Good", bert_tok, False, 2)
    with pytest.raises(ConfigError, match="gives 2 labels but the dataset has 3 classes"):
        Prompt.build(ONE, Verbalizer.parse("bad,good", 2), bert_tok, False, 3)
    with pytest.raises(ConfigError, match="starts with the answer slot; a causal LM predicts"):
        Prompt.build(" [MASK] . <s1>", "bad,good", bpe, True, 2)
    with pytest.raises(ConfigError, match="starts with the answer slot"):
        Prompt.build("  [MASK]<s1>", "bad,good", bpe, True, 2)
    with pytest.raises(ConfigError, match="puts <s2> after the answer slot; a causal LM sees only the text before"):
        Prompt.build(PAIR, "Yes,No", bpe, True, 2)


# --- encoding -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("template, examples", [
    (ONE, SINGLES), ("Review: <s1> Sentiment: [MASK]", SINGLES), ("<s1>[MASK] !", SINGLES),
    ("<s1> ? <s2> ? [MASK]", PAIRS), ("<s1> , <s2> . It was [MASK] .", PAIRS), ("<s1>   <s2>[MASK]", PAIRS),
])
def test_causal_ids_equal_tokenizing_the_text_before_the_answer(bpe, template, examples):
    p = Prompt.build(template, "bad,great", bpe, True, 2)
    batch = p.encode(examples, 128)
    for i, e in enumerate(examples):
        want = bpe(filled(template, e, upto_mask=True))["input_ids"]
        n = int(batch["attention_mask"][i].sum())
        assert batch["input_ids"][i, :n].tolist() == want
        assert batch["answer"][i] == n - 1
        assert (batch["input_ids"][i, n:] == bpe.eos_token_id).all()
    assert "token_type_ids" not in batch


@pytest.mark.parametrize("template, examples", [(ONE, SINGLES), (PAIR, PAIRS), ("<s1> [MASK] , <s2>", PAIRS)])
def test_masked_ids_equal_tokenizing_the_filled_template(bert_tok, template, examples):
    p = Prompt.build(template, "bad,great", bert_tok, False, 2)
    batch = p.encode(examples, 128)
    for i, e in enumerate(examples):
        want = bert_tok(filled(template, e, upto_mask=False))["input_ids"]
        n = int(batch["attention_mask"][i].sum())
        assert batch["input_ids"][i, :n].tolist() == want
        assert batch["input_ids"][i, batch["answer"][i]] == bert_tok.mask_token_id
    assert batch["token_type_ids"].shape == batch["input_ids"].shape and not batch["token_type_ids"].any()


def test_truncation_keeps_the_template_and_the_answer(bert_tok, bpe):
    long = Example(" ".join(["wonderful"] * 300), None, 1.0)
    p = Prompt.build(ONE, "bad,great", bert_tok, False, 2)
    ids = p.encode([long, SINGLES[1]], 12)["input_ids"]
    assert ids.shape == (2, 12)
    tail = bert_tok(" it was [MASK] .")["input_ids"][1:]  # ... it was [MASK] . [SEP]
    assert ids[0, -len(tail):].tolist() == tail and ids[0, 0] == bert_tok.cls_token_id
    c = Prompt.build(ONE, "bad,great", bpe, True, 2)
    batch = c.encode([long], 10)
    assert batch["input_ids"].shape == (1, 10) and batch["answer"].tolist() == [9]
    assert batch["input_ids"][0, -2:].tolist() == bpe(" It was")["input_ids"]


def test_pair_truncation_cuts_the_longer_sentence(bert_tok):
    p = Prompt.build(PAIR, "Yes,No", bert_tok, False, 2)
    short = "the sky is blue"
    e = Example(" ".join(["cloud"] * 100), short, 0.0)
    ids = p.encode([e], 20)["input_ids"][0].tolist()
    assert len(ids) == 20
    tail = bert_tok(" ? [MASK] , " + short, add_special_tokens=False)["input_ids"] + [bert_tok.sep_token_id]
    assert ids[-len(tail):] == tail  # the short sentence and the template are whole


def test_fit_matches_cutting_the_longer_one_token_at_a_time():
    def naive(a, b, room):
        while a + b > room:
            a, b = (a - 1, b) if a > b else (a, b - 1)
        return [a, b]
    for a in range(8):
        for b in range(8):
            for room in range(2, 12):
                assert prompts._fit([a, b], room) == naive(a, b, room), (a, b, room)
    assert prompts._fit([30], 7) == [7]


def test_encode_errors(bert_tok):
    one = Prompt.build(ONE, "bad,great", bert_tok, False, 2)
    with pytest.raises(ConfigError, match="takes one sentence, dataset has pairs"):
        one.encode(PAIRS, 64)
    with pytest.raises(ConfigError, match="takes two sentences .* dataset has single sentences"):
        Prompt.build(PAIR, "Yes,No", bert_tok, False, 2).encode(SINGLES, 64)
    # [CLS] it was [MASK] . [SEP]: 6 tokens, one more for the sentence
    with pytest.raises(ConfigError, match="takes 6 tokens .* max_length=6; give max_length >= 7"):
        one.encode(SINGLES, 6)
    assert one.encode(SINGLES, 7)["input_ids"].shape == (3, 7)


# --- class scores -------------------------------------------------------------------------------------------------

def test_masked_class_logits_read_the_mask_position(bert_tok):
    model = mlm()
    p = Prompt.build(ONE, "bad|terrible|awful,great|good", bert_tok, False, 2)
    batch = p.encode(SINGLES, 64)
    with torch.no_grad():
        got = p.class_logits(model, batch)
        logits = model(**{k: v for k, v in batch.items() if k != "answer"}).logits  # (B, T, V)
    where = (batch["input_ids"] == bert_tok.mask_token_id).nonzero()  # (B, 2): row, position
    assert where[:, 0].tolist() == [0, 1, 2]
    want = by_hand(logits[where[:, 0], where[:, 1]], p.label_ids)
    assert got.shape == (3, 2) and got.dtype == torch.float32
    torch.testing.assert_close(got, want)
    wrong = by_hand(logits[:, 0], p.label_ids)  # the [CLS] row: a misread position would not match
    assert not torch.allclose(got, wrong)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("wrap", [False, True], ids=["logits_to_keep", "full-logits"])
def test_causal_class_logits_equal_each_example_alone(bpe, kind, wrap):
    inner = causal_lm(kind)
    model = NoKeep(inner) if wrap else inner
    assert takes_logits_to_keep(model) is not wrap
    p = Prompt.build(ONE, "bad|terrible,great|good|fine", bpe, True, 2)
    batch = p.encode(SINGLES, 64)
    seen = []
    head = inner.lm_head.register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    with torch.no_grad():
        got = p.class_logits(model, batch)
    head.remove()
    assert len(set(batch["answer"].tolist())) == 3  # different lengths, right-padded
    assert seen == ([batch["input_ids"].shape[1]] if wrap else [3])  # logits_to_keep: 3 rows projected
    for i, e in enumerate(SINGLES):
        alone = torch.tensor([bpe(filled(ONE, e, upto_mask=True))["input_ids"]])
        with torch.no_grad():
            last = inner(input_ids=alone).logits[:, -1]  # (1, V)
        torch.testing.assert_close(got[i:i + 1], by_hand(last, p.label_ids), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_gradients_flow(bert_tok, bpe, kind):
    model = mlm() if kind == "bert" else causal_lm("gpt2")
    p = Prompt.build(ONE, "bad,great", bert_tok if kind == "bert" else bpe, kind == "gpt2", 2)
    scores = p.class_logits(model, p.encode(SINGLES, 64))
    torch.nn.functional.cross_entropy(scores, torch.tensor([1, 0, 1])).backward()
    grads = {n: q.grad for n, q in model.named_parameters()}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), \
        [n for n, g in grads.items() if g is None or not g.abs().sum()]


@pytest.mark.parametrize("wrap", [False, True], ids=["logits_to_keep", "full-logits"])
def test_prepended_soft_prompt_reads_positions_from_the_end(bpe, wrap):
    inner = causal_lm("gpt2")
    attach(inner, {"embed": PromptTuning(3)})
    model = NoKeep(inner) if wrap else inner
    p = Prompt.build(ONE, "bad,great|good", bpe, True, 2)
    batch = p.encode(SINGLES, 64)
    T = batch["input_ids"].shape[1]
    with torch.no_grad():
        got = p.class_logits(model, batch)
        logits = inner(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.shape[1] == T + 3
    rows = torch.arange(3)
    torch.testing.assert_close(got, by_hand(logits[:, -T:][rows, batch["answer"]], p.label_ids))
    assert not torch.allclose(got, by_hand(logits[rows, batch["answer"]], p.label_ids))  # unshifted reads differ


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("soft", [0, 3], ids=["plain", "soft-prompt"])
def test_head_pooling_projects_one_logit_row_and_pools_the_last_hidden_states(bpe, kind, soft):
    model = causal_lm(kind)
    if soft:
        attach(model, {"embed": PromptTuning(soft)})
    encoder = Encoder(model, bpe, 64)
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    with torch.no_grad():
        got = encoder(SINGLES)
    hook.remove()
    assert seen == [1]  # the (B, T, V) logits are never made
    batch = encoder.tokenize(SINGLES)
    mask = batch["attention_mask"]
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=mask, output_hidden_states=True)
    hidden = out.hidden_states[-1]
    assert hidden.shape[1] == mask.shape[1] + soft
    m = mask.unsqueeze(-1).float()
    want = (hidden[:, soft:] * m).sum(1) / m.sum(1)
    assert got.shape == (3, 32)
    torch.testing.assert_close(got, want)


def test_mask_text_inside_a_sentence_does_not_move_the_answer(bert_tok):
    p = Prompt.build(ONE, "bad,great", bert_tok, False, 2)
    batch = p.encode([Example("the [MASK] token is here", None, 1.0)], 64)
    masks = (batch["input_ids"][0] == bert_tok.mask_token_id).nonzero().flatten().tolist()
    assert len(masks) == 2 and batch["answer"].tolist() == [masks[1]]  # the template's, not the sentence's
