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
import torch
from torch import Tensor, nn

from .errors import LoadError, WriteError
from .files import atomic_write

FORMAT = "adaptune/1"


def fingerprint(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    return {"class": type(model).__name__, "model_type": getattr(config, "model_type", None),
            "hidden_size": getattr(config, "hidden_size", None)}


def read(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metadata, tensors) of a saved adaptation; LoadError if it is not one."""
    path = Path(path)
    if path.is_dir():
        raise LoadError(f"{str(path)!r} is a directory; a saved adaptation is one .safetensors file "
                        f"(a PEFT adapter directory loads with import_peft)")
    if not path.is_file():
        raise LoadError(f"no saved adaptation at {str(path)!r}")
    try:
        with open(path, "rb"):
            pass
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("adaptune")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except PermissionError as e:
        raise LoadError(f"cannot read {str(path)!r}: permission denied") from e
    except (SafetensorError, OSError, ValueError) as e:
        raise LoadError(f"{str(path)!r} is not a readable safetensors file: {e}") from e
    if raw is None:
        raise LoadError(f"{str(path)!r} holds no adaptune metadata (was it written by adaptune.save?)")
    return _check_meta(raw, path), tensors


def _check_meta(raw: str, path: Path) -> dict[str, Any]:
    """The metadata JSON, checked for the shape load() reads: a clear LoadError for anything else."""
    def bad(what: str) -> LoadError:
        return LoadError(f"{str(path)!r} has damaged adaptune metadata: {what}")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise bad(f"not JSON ({e})") from e
    if not isinstance(meta, dict):
        raise bad(f"a JSON object expected, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise LoadError(f"{str(path)!r} has format {meta.get('format')!r}; this version reads {FORMAT!r}")
    spec, model = meta.get("spec"), meta.get("model")
    if not isinstance(model, dict) or not isinstance(spec, dict):
        raise bad("'model' and 'spec' must be JSON objects")
    if not isinstance(spec.get("shared"), dict) or not isinstance(spec.get("tasks"), dict) or \
            not all(isinstance(t, dict) for t in spec["tasks"].values()):
        raise bad("'spec' must hold 'shared' (selector -> stack) and 'tasks' (name -> selector -> stack)")
    if not isinstance(meta.get("active"), (str, type(None))):
        raise bad(f"'active' must be a task name or null, got {meta.get('active')!r}")
    return meta


def check_finite(tensors: dict[str, Tensor], where: str) -> None:
    """LoadError naming the first tensor that holds NaN or inf."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise LoadError(f"{where}: tensor {name!r} holds NaN or inf; refusing to load it "
                            f"(pass allow_nonfinite=True to load it anyway)")


def check_state(own: dict[str, Tensor], given: dict[str, Tensor], what: str, needs: str,
                error: type[Exception] = LoadError) -> None:
    """`error` (LoadError) unless `given` has exactly the names and shapes of the state dict `own`: `what` names
    the given tensors' source, `needs` what they must fit (as "<what> does not match <needs>")."""
    missing, unexpected = sorted(set(own) - set(given)), sorted(set(given) - set(own))
    if missing or unexpected:
        raise error(f"{what} does not match {needs}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    wrong = [f"{k}: saved {tuple(t.shape)}, model needs {tuple(own[k].shape)}"
             for k, t in given.items() if tuple(t.shape) != tuple(own[k].shape)]
    if wrong:
        raise error(f"{what} has tensors of other shapes than {needs}: " + "; ".join(wrong[:3]))


def write(adaptation: Any, path: str | os.PathLike) -> Path:
    """Write `adaptation`'s components (not the base weights) to one .safetensors file; returns its path."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in adaptation.state_dict().items()}
    meta = {"format": FORMAT, "spec": adaptation.spec(), "active": adaptation.task,
            "model": fingerprint(adaptation.model)}
    try:
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"adaptune": json.dumps(meta)}))
    except SafetensorError as e:
        raise WriteError(f"cannot save to {str(path)!r}: {e}") from e
    return path
