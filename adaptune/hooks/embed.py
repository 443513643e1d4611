"""Puts the active soft prompts in front of the input embeddings (prompt tuning).

A forward pre-hook (with kwargs) on the model the adaptation is attached to. Positional arguments are
bound to names by the signature of `model.forward` and passed on as keyword arguments.

Fresh forward (no cache, or an empty one):
    input_ids -> inputs_embeds through the input embedding, the prompts (P rows) prepended;
    attention_mask gets P ones on the left, token_type_ids P zeros, 2-D token labels P × -100;
    given position_ids become [0..P-1, position_ids + P] (the prompt takes the first positions).
Continuing from a non-empty cache (generate's decoding steps), the prompt is already in the cache:
    attention_mask gets P ones on the left, given position_ids are shifted by P.
Outputs include the P virtual positions at the front.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import AdaptuneError
from .base import Hook


def _cache_length(cache: Any) -> int:
    if cache is None:
        return 0
    get = getattr(cache, "get_seq_length", None)
    return int(get()) if get is not None else 1  # an unknown cache object: assume it holds the prompt


def _left(x: Tensor, p: int, value: int) -> Tensor:
    """`x` (..., T) with p columns of `value` on the left: (..., p + T)."""
    return torch.cat([x.new_full((*x.shape[:-1], p), value), x], dim=-1)


class PromptHook(Hook):
    def install(self) -> None:
        model = self.point.model
        self._signature = inspect.signature(model.forward)
        self._handle = model.register_forward_pre_hook(self._before, with_kwargs=True)

    def remove(self) -> None:
        self._handle.remove()

    def _kwargs(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Every argument by name (positional ones bound by the forward's signature)."""
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError:
            return {}  # let the model raise its own error
        out: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            kind = self._signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                out.update(value)
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                if value:
                    raise AdaptuneError(f"PromptTuning cannot name the extra positional arguments of "
                                        f"{type(self.point.model).__name__}.forward; pass them by keyword")
            else:
                out[name] = value
        return out

    def _before(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        active = self.active()
        if not active:
            return None
        kw = self._kwargs(args, kwargs)
        if not kw:
            return None
        prompt = torch.cat([bound() for _, bound in active], dim=0)  # (P, d)
        p = prompt.shape[0]
        mask = kw.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise AdaptuneError(f"PromptTuning needs a 2-D attention_mask (batch, tokens) or None; got shape "
                                f"{tuple(mask.shape)} (pre-built 4-D masks and static caches are not supported)")
        position_ids = kw.get("position_ids")
        if _cache_length(kw.get("past_key_values")) > 0:  # decoding: the prompt is in the cache
            if mask is not None:
                kw["attention_mask"] = _left(mask, p, 1)
            if position_ids is not None:
                kw["position_ids"] = position_ids + p
            return (), kw
        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        if embeds is None:
            if ids is None:
                return None
            embeds = self.point.module(ids)  # (B, T, d)
        b, t = embeds.shape[:2]
        kw["input_ids"] = None
        front = prompt.to(embeds.dtype).unsqueeze(0).expand(b, -1, -1)  # (B, P, d)
        kw["inputs_embeds"] = torch.cat([front, embeds], dim=1)  # (B, P + T, d)
        if mask is not None:
            kw["attention_mask"] = _left(mask, p, 1)
        if kw.get("token_type_ids") is not None:
            kw["token_type_ids"] = _left(kw["token_type_ids"], p, 0)
        if position_ids is not None:
            first = torch.arange(p, dtype=position_ids.dtype, device=position_ids.device)
            first = first.expand(*position_ids.shape[:-1], p)
            kw["position_ids"] = torch.cat([first, position_ids + p], dim=-1)
        labels = kw.get("labels")
        if isinstance(labels, Tensor) and labels.dim() == 2 and tuple(labels.shape) == (b, t):
            kw["labels"] = _left(labels, p, -100)
        return (), kw
