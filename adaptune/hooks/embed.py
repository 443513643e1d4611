"""Puts the active soft prompts in front of the input embeddings (prompt tuning).

A forward pre-hook (with kwargs) on the model the adaptation is attached to. Positional arguments are
bound to names by the signature of `model.forward` and passed on as keyword arguments.

Fresh forward (no cache, or an empty one):
    input_ids -> inputs_embeds through the input embedding, the prompts (P rows) prepended;
    attention_mask gets P ones on the left, token_type_ids P zeros, 2-D token labels P × -100;
    given position_ids / cache_position become [0..P-1, ids + P] (the prompt takes the first positions).
Continuing from a non-empty cache (generate's decoding steps), the prompt is already in the cache:
    attention_mask gets P ones on the left, given position_ids / cache_position are shifted by P.
Outputs include the P virtual positions at the front.

Encoder-decoder models (T5, BART): the prompt goes in front of the encoder's input, as in PEFT. The
pre-hook sits on the encoder, so `generate` (which runs the encoder alone) sees it too, and a second
one on the model widens the `attention_mask` the decoder's cross-attention reads by P, when it is the
unprompted width (P less than the encoder output). The decoder's inputs and labels are untouched.

The KV cache is found by what it is, not by its argument's name (transformers has called it
`past_key_values`, `cache_params` and `cache`): any transformers `Cache` among the arguments, else a
legacy tuple of per-layer (key, value) pairs under one of those names.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import AdaptuneError
from .base import Hook


POSITIONS = ("position_ids", "cache_position")  # (..., T) positions of the tokens
CACHE_NAMES = ("cache", "past_key_values", "cache_params")  # the KV cache's names across transformers versions


def _cache_length(kw: dict[str, Any]) -> int:
    """How many positions the forward's KV cache holds (0: none, or an empty one: a fresh forward)."""
    from transformers.cache_utils import Cache
    found = {n: v for n, v in kw.items() if isinstance(v, Cache) or (n in CACHE_NAMES and v is not None)}
    if len(found) > 1:
        raise AdaptuneError(f"PromptTuning found more than one KV cache among the forward's arguments "
                            f"({', '.join(found)}); pass one")
    if not found:
        return 0
    (cache,) = found.values()
    if isinstance(cache, Cache):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)):  # legacy: per layer (key, value), key (B, H, T, D)
        return int(cache[0][0].shape[-2]) if cache and cache[0] is not None and len(cache[0]) else 0
    raise AdaptuneError(f"PromptTuning cannot tell how many positions the KV cache {type(cache).__name__} holds; "
                        f"pass a transformers Cache (such as DynamicCache) or None")


def _left(x: Tensor, p: int, value: int) -> Tensor:
    """`x` (..., T) with p columns of `value` on the left: (..., p + T)."""
    return torch.cat([x.new_full((*x.shape[:-1], p), value), x], dim=-1)


def _check_mask(mask: Tensor | None) -> None:
    if mask is not None and mask.dim() != 2:
        raise AdaptuneError(f"PromptTuning needs a 2-D attention_mask (batch, tokens) or None; got shape "
                            f"{tuple(mask.shape)} (pre-built 4-D masks and static caches are not supported)")


def _pad_types_and_labels(kw: dict[str, Any], p: int, b: int, t: int) -> None:
    """token_type_ids get p zeros on the left, 2-D token labels (b, t) p × -100 (the prompt is never a target)."""
    if kw.get("token_type_ids") is not None:
        kw["token_type_ids"] = _left(kw["token_type_ids"], p, 0)
    labels = kw.get("labels")
    if isinstance(labels, Tensor) and labels.dim() == 2 and tuple(labels.shape) == (b, t):
        kw["labels"] = _left(labels, p, -100)


def _learned_positions(model: nn.Module) -> int | None:
    """How many positions a model with learned absolute position embeddings has (GPT-2's wpe, BERT's
    position_embeddings); None for models without a table (rotary), which index nothing."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in ("wpe", "position_embeddings"):
            return module.num_embeddings
    return None


def _encoder(model: nn.Module) -> nn.Module | None:
    """The encoder of an encoder-decoder model; None for other models."""
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False) or not hasattr(model, "get_encoder"):
        return None
    encoder = model.get_encoder()
    return encoder if isinstance(encoder, nn.Module) and encoder is not model else None


class PromptHook(Hook):
    def install(self) -> None:
        model = self.point.model
        self._positions = _learned_positions(model)
        encoder = _encoder(model)
        prompted = encoder if encoder is not None else model
        self._prompted = prompted
        self._signatures = {id(m): inspect.signature(m.forward) for m in (model, prompted)}
        self._handles = [prompted.register_forward_pre_hook(self._before, with_kwargs=True)]
        if encoder is not None:
            self._handles.append(model.register_forward_pre_hook(self._cross_mask, with_kwargs=True))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def _kwargs(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Every argument by name (positional ones bound by the forward's signature)."""
        signature = self._signatures[id(module)]
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return {}  # let the model raise its own error
        out: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            kind = signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                out.update(value)
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                if value:
                    raise AdaptuneError(f"PromptTuning cannot name the extra positional arguments of "
                                        f"{type(self.point.model).__name__}.forward; pass them by keyword")
            else:
                out[name] = value
        return out

    def _layout(self, active: list) -> tuple[list[str | None], list[Tensor]] | None:
        """Inside route() with per-task prompts: the groups present and each one's prompt (shared rows first,
        in binding order), (P_g, d); None when every sample gets the same prompt."""
        route = self.adaptation.routing
        if route is None or all(b.group is None for b in active):
            return None
        groups = route.groups
        prompts = [[b.module() for b in active if b.group is None or b.group == g] for g in groups]
        width = active[0].module().shape[1]
        return groups, [torch.cat(p, dim=0) if p else active[0].module().new_zeros(0, width) for p in prompts]

    def _lengths(self, layout: tuple[list, list[Tensor]], b: int, device: torch.device) -> Tensor:
        """(B,) each sample's prompt length."""
        groups, prompts = layout
        lengths = torch.tensor([p.shape[0] for p in prompts], device=device)
        return lengths[self.adaptation.routing.local(groups, b, device, "PromptTuning")]

    def _before(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        active = self.active()
        if not active:
            return None
        kw = self._kwargs(model, args, kwargs)
        if not kw:
            return None
        _check_mask(kw.get("attention_mask"))
        layout = self._layout(active)
        if layout is not None:
            return self._routed(kw, layout)
        return self._same(kw, torch.cat([b.module() for b in active], dim=0))

    def _embeds(self, kw: dict[str, Any]) -> Tensor | None:
        """The input embeddings (B, T, d): given, or looked up from input_ids; None when neither is given."""
        if kw.get("inputs_embeds") is not None:
            return kw["inputs_embeds"]
        return None if kw.get("input_ids") is None else self.point.module(kw["input_ids"])

    def _same(self, kw: dict[str, Any], prompt: Tensor) -> tuple[tuple, dict] | None:
        """Every sample gets `prompt` (P, d)."""
        p, mask = prompt.shape[0], kw.get("attention_mask")
        cached = _cache_length(kw)
        tokens = next((kw[n].shape[1] for n in ("input_ids", "inputs_embeds") if kw.get(n) is not None), 0)
        if self._positions is not None and cached + (0 if cached else p) + tokens > self._positions:
            used = cached if cached else p
            raise AdaptuneError(f"PromptTuning: {tokens} tokens after {used} positions ({p} of them the prompt) "
                                f"exceed the model's {self._positions} positions; at most "
                                f"{max(self._positions - used, 0)} tokens fit")
        if cached > 0:  # decoding: the prompt is in the cache
            if mask is not None:
                kw["attention_mask"] = _left(mask, p, 1)
            for name in POSITIONS:
                if kw.get(name) is not None:
                    kw[name] = kw[name] + p
            return (), kw
        embeds = self._embeds(kw)
        if embeds is None:
            return None
        b, t = embeds.shape[:2]
        kw["input_ids"] = None
        front = prompt.to(embeds.dtype).unsqueeze(0).expand(b, -1, -1)  # (B, P, d)
        kw["inputs_embeds"] = torch.cat([front, embeds], dim=1)  # (B, P + T, d)
        if mask is not None and mask.shape[-1] == t:  # the model's hook may have widened it (encoder-decoder)
            kw["attention_mask"] = _left(mask, p, 1)
        for name in POSITIONS:
            if (pos := kw.get(name)) is not None:
                first = torch.arange(p, dtype=pos.dtype, device=pos.device).expand(*pos.shape[:-1], p)
                kw[name] = torch.cat([first, pos + p], dim=-1)  # (..., P + T)
        _pad_types_and_labels(kw, p, b, t)
        return (), kw

    def _routed(self, kw: dict[str, Any], layout: tuple[list, list[Tensor]]) -> tuple[tuple, dict]:
        """Prompts of different lengths per sample: each sample sees [padding, its prompt, its tokens], the
        padding masked out (P = the longest prompt columns in front of every sample), its prompt at positions
        0..P_g-1 and its tokens after them, as if it ran alone."""
        groups, prompts = layout
        p = max(x.shape[0] for x in prompts)
        mask = kw.get("attention_mask")
        cached = _cache_length(kw)
        source = next((kw[n] for n in ("input_ids", "inputs_embeds") if kw.get(n) is not None), None)
        if source is None:
            return (), kw
        b, t, device = source.shape[0], source.shape[1], source.device
        lengths = self._lengths(layout, b, device)  # (B,)
        if self._positions is not None and int(lengths.max()) + max(cached - p, 0) + t > self._positions:
            raise AdaptuneError(f"PromptTuning: {t} tokens after the prompt exceed the model's {self._positions} "
                                f"positions")
        front = torch.arange(p, device=device)[None, :] >= (p - lengths)[:, None]  # (B, P): prompt columns
        if mask is None:
            mask = torch.ones(b, t + (cached - p if cached else 0), dtype=torch.long, device=device)
        kw["attention_mask"] = torch.cat([front.to(mask.dtype), mask], dim=-1)
        takes_positions = "position_ids" in self._signatures[id(self._prompted)].parameters
        if self._positions is not None and not takes_positions:
            raise AdaptuneError(f"PromptTuning: prompts of different lengths in one batch need position_ids, which "
                                f"{type(self.point.model).__name__}.forward does not take; route samples with equal "
                                f"prompt lengths together")
        pos, cache_pos = kw.get("position_ids"), kw.get("cache_position")
        if pos is None and takes_positions:
            start = cache_pos[None, :] if cache_pos is not None else \
                torch.arange(max(cached - p, 0), max(cached - p, 0) + t, device=device)[None, :]
            pos = start.expand(b, t)  # the tokens' positions without a prompt
        if pos is not None:
            pos = pos + lengths.view(-1, *[1] * (pos.dim() - 1)).to(pos.dtype)
        if cache_pos is not None:
            cache_pos = cache_pos + p
        if cached > 0:  # decoding: the prompts are in the cache
            kw["position_ids"], kw["cache_position"] = pos, cache_pos
            if pos is None:
                kw.pop("position_ids")
            if cache_pos is None:
                kw.pop("cache_position")
            return (), kw
        embeds = self._embeds(kw)  # (B, T, d)
        table = torch.stack([torch.nn.functional.pad(x, (0, 0, p - x.shape[0], 0)) for x in prompts])  # (G, P, d)
        index = self.adaptation.routing.local(groups, b, device, "PromptTuning")
        kw["input_ids"] = None
        kw["inputs_embeds"] = torch.cat([table[index].to(embeds.dtype), embeds], dim=1)  # (B, P + T, d)
        if pos is not None:
            prompt_pos = (torch.arange(p, device=device)[None, :] - (p - lengths)[:, None]).clamp_min(0)
            kw["position_ids"] = torch.cat([prompt_pos.to(pos.dtype).expand(*pos.shape[:-1], p), pos], dim=-1)
        if cache_pos is not None:
            kw["cache_position"] = torch.cat([torch.arange(p, dtype=cache_pos.dtype, device=device), cache_pos])
        _pad_types_and_labels(kw, p, b, t)
        return (), kw

    def _cross_mask(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        """Encoder-decoder models: the attention_mask widened by P where the encoder output is P longer."""
        active = self.active()
        kw = self._kwargs(model, args, kwargs) if active else {}
        mask = kw.get("attention_mask")
        if mask is None or mask.dim() != 2:
            return None
        layout = self._layout(active)
        p = max(x.shape[0] for x in layout[1]) if layout else sum(b.module().shape[0] for b in active)
        encoded = kw.get("encoder_outputs")
        if encoded is not None:
            length = encoded[0].shape[1]  # (B, T_enc, d)
        else:
            tokens = next((kw[n].shape[1] for n in ("input_ids", "inputs_embeds") if kw.get(n) is not None), None)
            if tokens is None:
                return None
            length = p + tokens
        if mask.shape[-1] + p != length:
            return None  # already widened, or a width the model will refuse itself
        if layout is None:
            kw["attention_mask"] = _left(mask, p, 1)
        else:
            lengths = self._lengths(layout, mask.shape[0], mask.device)
            front = torch.arange(p, device=mask.device)[None, :] >= (p - lengths)[:, None]  # (B, P)
            kw["attention_mask"] = torch.cat([front.to(mask.dtype), mask], dim=-1)
        return (), kw
