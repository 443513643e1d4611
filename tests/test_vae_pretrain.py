"""`adaptune pretrain-lm`: a small GPT-2 trained from scratch on the corpora's train splits, loadable as a base."""

import pytest
import torch
from typer.testing import CliRunner

from adaptune import ConfigError
from adaptune.cli.app import app
from adaptune.experiments.common.causal import load_base
from adaptune.experiments.vae.data import Collate, by_length, length_grouped, load_corpus
from adaptune.experiments.vae.pretrain import PretrainConfig, pretrain, read_pretrained

TINY = dict(layers=1, hidden=32, heads=2, vocab=300, steps=40, batch_size=16, lr=3e-3, train_limit=300, eval_limit=40)
TINY_FLAGS = ["--layers", "1", "--hidden", "32", "--heads", "2", "--vocab", "300", "--steps", "3", "--batch-size", "8",
              "--train-limit", "50", "--eval-limit", "10"]
runner = CliRunner()


def test_pretraining_learns_and_saves_a_base_that_loads(tmp_path):
    out = tmp_path / "lm"
    result = pretrain(PretrainConfig(**TINY), out)
    losses = [row["loss"] for row in result["history"]]
    assert losses[-1] < losses[0] - 0.5  # it learned something in 40 steps
    assert result["vocab"] == 300 and set(result["held_out"]) == {"yelp", "ptb", "wikitext2"}
    assert result["train_sentences"] == {"yelp": 300, "ptb": 300, "wikitext2": 300}
    for h in result["held_out"].values():
        assert h["split"] == "valid" and h["sentences"] == 40 and 1 < h["ppl"] < 300
    assert read_pretrained(out)["held_out"] == result["held_out"]
    model, tok = load_base(str(out))
    assert type(model).__name__ == "GPT2LMHeadModel" and not model.training
    assert tok.bos_token == tok.eos_token == "<|endoftext|>" and len(tok) == 300
    ids = Collate(tok)(["the food was great ."])["input_ids"]
    assert tok.decode(ids[0, 1:-1]) == "the food was great ."  # byte-level BPE round trip


def test_the_small_gpt2_base_is_read_from_the_cache_or_named_as_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTUNE_CACHE", str(tmp_path))
    with pytest.raises(ConfigError, match="adaptune pretrain-lm"):
        load_base("small-gpt2")
    pretrain(PretrainConfig(**{**TINY, "steps": 2}))  # the default destination: the cache
    model, _ = load_base("small-gpt2")
    assert model.config.n_layer == 1


def test_pretrain_lm_cli_builds_once_and_never_replaces_a_foreign_directory(tmp_path):
    out = tmp_path / "lm"
    first = runner.invoke(app, ["pretrain-lm", "--out", str(out), *TINY_FLAGS])
    assert first.exit_code == 0, first.output
    assert "wikitext2" in first.output and "PPL" in first.output
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    again = runner.invoke(app, ["pretrain-lm", "--out", str(out), *TINY_FLAGS])
    assert again.exit_code == 0 and "already built" in " ".join(again.output.split())
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    refused = runner.invoke(app, ["pretrain-lm", "--out", str(foreign), "--overwrite", *TINY_FLAGS])
    assert refused.exit_code == 2 and "not a model of `adaptune pretrain-lm`" in refused.output
    assert (foreign / "notes.txt").read_text() == "keep"


@pytest.mark.parametrize("bad, match", [({"hidden": 30, "heads": 4}, "multiple of --heads"),
                                        ({"vocab": 100}, "at least 258"), ({"lr": float("nan")}, "--lr"),
                                        ({"steps": 0}, "--steps"), ({"dropout": 1.0}, "--dropout")])
def test_bad_pretrain_settings_are_named(bad, match):
    with pytest.raises(ConfigError, match=match):
        PretrainConfig(**bad)


def test_length_grouped_batches_cover_each_pass_once_with_little_padding():
    texts = load_corpus("yelp", "train", limit=400).texts
    collate = Collate(load_base("tiny-gpt2")[1], max_length=128)  # bytes: Yelp's sentences vary in length
    batches = length_grouped(texts, 8, collate, seed=0, pool=10)
    first_pass = [next(batches) for _ in range(50)]  # 400 sentences, 8 per batch
    assert all(b["input_ids"].shape[0] == 8 for b in first_pass)
    assert sum(int(b["n_tokens"].sum()) for b in first_pass) == sum(len(r) for r in collate.ids(texts))
    padded = sum(b["attention_mask"].numel() for b in first_pass)
    shuffled = [collate(texts[i:i + 8]) for i in range(0, 400, 8)]
    assert padded < 0.8 * sum(b["attention_mask"].numel() for b in shuffled)
    again = [next(length_grouped(texts, 8, collate, seed=0, pool=10)) for _ in range(1)]
    assert torch.equal(again[0]["input_ids"], first_pass[0]["input_ids"])  # seeded


def test_evaluation_batches_hold_every_sentence_once_by_length():
    texts = load_corpus("ptb", "valid", limit=50).texts
    collate = Collate(load_base("tiny-gpt2")[1])
    batches = by_length(texts, 16, collate)
    lengths = [int(n) for b in batches for n in b["n_tokens"]]
    assert lengths == sorted(len(r) for r in collate.ids(texts)) and len(lengths) == 50
