"""The file of a saved adaptation: component parameters (safetensors) with the stacks as JSON in its
metadata, written atomically. Below the adaptation: it reads only what an adaptation exposes
(state_dict, spec, task, model), so `Adaptation.save` and `adaptune.save` share it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .errors import LoadError
from .files import atomic_write

FORMAT = "adaptune/1"


def fingerprint(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    return {"class": type(model).__name__, "model_type": getattr(config, "model_type", None),
            "hidden_size": getattr(config, "hidden_size", None)}


def read(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metadata, tensors) of a saved adaptation; LoadError if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise LoadError(f"no saved adaptation at {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("adaptune")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise LoadError(f"{str(path)!r} is not a readable safetensors file: {e}") from e
    if raw is None:
        raise LoadError(f"{str(path)!r} holds no adaptune metadata (was it written by adaptune.save?)")
    meta = json.loads(raw)
    if meta.get("format") != FORMAT:
        raise LoadError(f"{str(path)!r} has format {meta.get('format')!r}; this version reads {FORMAT!r}")
    return meta, tensors


def write(adaptation: Any, path: str | os.PathLike) -> Path:
    """Write `adaptation`'s components (not the base weights) to one .safetensors file; returns its path."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in adaptation.state_dict().items()}
    meta = {"format": FORMAT, "spec": adaptation.spec(), "active": adaptation.task,
            "model": fingerprint(adaptation.model)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"adaptune": json.dumps(meta)}))
    return path
