"""The bases whose hidden states are pooled (`adaptune run multitask`, `adaptune inspect`, the encoder bases of
`adaptune run fewshot`) and their tokenizers: a preset, a local Hugging Face directory, or a hub name in the
local cache (nothing is downloaded)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import ConfigError
from ...models import PRESETS, load_model, minilm_path

if TYPE_CHECKING:
    from torch import nn


def load_tokenizer(model_name: str, tokenizer: str | None = None) -> Any:
    """The tokenizer for `model_name`: MiniLM's for 'minilm' and the random bert presets, the model
    directory's own, or a hub name from the local cache."""
    from transformers import AutoTokenizer
    if tokenizer is None:
        if model_name in PRESETS and model_name.startswith("gpt2"):
            raise ConfigError(f"no tokenizer ships with the random preset {model_name!r}: give --tokenizer DIR")
        tokenizer = str(minilm_path()) if model_name in PRESETS else model_name
    try:
        tok = AutoTokenizer.from_pretrained(str(tokenizer))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load a tokenizer from {tokenizer!r} (a local directory, or a hub name in the "
                          f"local cache; downloads are off unless HF_HUB_OFFLINE=0): {e}") from e
    if tok.pad_token is None:  # GPT-2
        tok.pad_token = tok.eos_token
    return tok


def load_base(name: str, seed: int) -> nn.Module:
    """A preset or local directory (adaptune.models.load_model), else a hub name from the local cache."""
    valid = f"give one of {', '.join(PRESETS)}, a local Hugging Face BERT/GPT-2 directory, or a hub name in the local cache"
    path = Path(name)
    if name in PRESETS or path.is_dir():
        try:
            return load_model(name, seed=seed)
        except ConfigError as e:
            raise ConfigError(f"{e}; {valid}") from e
    if path.exists():
        raise ConfigError(f"{name}: a file, not a model; {valid}")
    from transformers import AutoModel
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return AutoModel.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise ConfigError(f"unknown model {name!r}: {valid} ({e})") from e
