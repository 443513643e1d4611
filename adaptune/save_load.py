"""save / load: component parameters (safetensors) with the stacks as JSON in the file's metadata.

One file holds everything `load` needs to rebuild the components without user code (the file itself:
save_format.py). Writes are atomic: a temporary file beside the target is renamed over it, so an existing
save is never lost.

FSDP2 (fully_shard): components are attached before sharding, so `load` either runs on every rank before
fully_shard (it builds the components; sharding then shards them), or after it onto a model whose
adaptation was attached before fully_shard: then the file's tensors fill the attached components' shards
(every rank calls it; the stacks must be the saved ones). A sharded model without an adaptation is refused.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from .adaptation import Adaptation, adaptation_of
from .attach import attach
from .components.base import Stack
from .errors import AdaptuneError, LoadError
from .save_format import agree, check_finite, check_fits, check_model, check_state, fsdp_modules, is_sharded, read


def save(model: nn.Module | Adaptation, path: str | os.PathLike) -> Path:
    """Save the components of `model`'s adaptation (not the base weights) to one .safetensors file."""
    return adaptation_of(model).save(path)


def load(model: nn.Module, path: str | os.PathLike, *, active: str | None = None,
         allow_nonfinite: bool = False) -> Adaptation:
    """Rebuild the saved components on `model` and load their parameters; all or nothing.
    A file whose tensors hold NaN or inf is refused unless `allow_nonfinite`. On a model sharded by FSDP2,
    see the module docstring."""
    present = getattr(model, "adaptune", None)
    if isinstance(present, Adaptation) and is_sharded(present):
        return _load_sharded(present, path, active, allow_nonfinite)
    if present is None and fsdp_modules(model):
        raise LoadError("this model is sharded by fully_shard and has no adaptation: components built now would "
                        "stay outside the shards. Call load(model, path) on every rank before fully_shard, or "
                        "attach(model, spec) before fully_shard and load(model, path) after it to fill the "
                        "sharded components")
    meta, tensors = read(path)
    if not allow_nonfinite:
        check_finite(tensors, repr(str(path)))
    check_model(meta, model, repr(str(path)))
    spec = meta["spec"]
    try:
        shared = {sel: Stack.from_dict(s) for sel, s in spec["shared"].items()}
        tasks = {name: {sel: Stack.from_dict(s) for sel, s in t.items()} for name, t in spec["tasks"].items()}
    except (AdaptuneError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise LoadError(f"{str(path)!r} has damaged adaptune metadata: its stacks do not rebuild ({e})") from e
    try:
        adaptation = attach(model, shared or None, tasks=tasks or None, active=active or meta.get("active"))
    except AdaptuneError as e:
        raise LoadError(f"{str(path)!r} does not fit this model: {e}") from e
    try:
        _load_tensors(adaptation, tensors, path)
    except BaseException:
        adaptation.detach()
        raise
    return adaptation


def _load_sharded(adaptation: Adaptation, path: Any, active: str | None, allow_nonfinite: bool) -> Adaptation:
    """The file's tensors into the shards of an adaptation that FSDP2 shards; every rank reads the file."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    where, error = repr(str(path)), None
    try:
        meta, tensors = read(path)
        if not allow_nonfinite:
            check_finite(tensors, where)
        check_fits(meta, adaptation, where)
        check_state(adaptation.state_dict(), tensors, where, "the attached components")
        active = active or meta.get("active")
        if active is not None and active not in adaptation.task_names:
            raise LoadError(f"cannot make {active!r} active: the attached adaptation has no such task")
    except Exception as e:
        error = e
    agree("load", path, adaptation, error, LoadError)
    set_model_state_dict(adaptation, tensors, options=StateDictOptions(full_state_dict=True, strict=True))
    return adaptation.use(active)


def _load_tensors(adaptation: Adaptation, tensors: dict[str, Any], path: Any) -> None:
    check_state(adaptation.state_dict(), tensors, repr(str(path)), "the rebuilt components")
    adaptation.load_state_dict(tensors, strict=True)


__all__ = ["load", "read", "save"]
