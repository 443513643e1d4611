"""Changes what attention modules attend to: prefixes in front of keys and values (prefix tuning),
per-sample latent keys and values (PSA, AtM), and the causal mask dropped (Bidirectional).

Transformers' attention modules call `ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation,
eager_attention_forward)(module, query, key, value, attention_mask, ...)` with key and value of shape
(B, H_kv, T_k, D), after the KV-cache update. We register wrappers of the supported implementations
under `adaptune_<impl>` (attention and mask interfaces alike), point the attention modules' config at
the wrapper while a component is attached, and put the original name back on remove.

For the calling module's active components, the wrapper
- drops the causal mask (Bidirectional): the padding mask is kept (a key is padding where the causal
  mask hides it from the last query, which sees every real key) and `is_causal=False` is passed on;
- concatenates the extra keys and values in front of key and value, (n, H_kv·D) rows shared by the
  batch (Prefix) or (B, n, H_kv·D) per sample (PSA and AtM, from the latent given by
  `adaptation.condition(z)`), and widens the mask on the left (True / 0.0: every query sees every
  extra position; a relative position bias passed along, T5's, gets zero columns too).
Extra keys and values are never written into the KV cache and take no positions, so generation with
a cache sees the same ones every step. Modules with no active component run the original
implementation unchanged.
"""
from __future__ import annotations

import sys
import weakref
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import AdaptuneError
from ..points import (ATTENTION_IMPLEMENTATIONS, ATTENTION_WRAPPER, attention_implementation,
                      base_implementation, check_attention_point, eager_attention)
from .base import Hook

ATTRIBUTE = "_adaptune_attention"  # on an attention module while its hook is installed (survives deepcopy)

_HOOKS: "weakref.WeakKeyDictionary[nn.Module, AttentionHook]" = weakref.WeakKeyDictionary()


# ---- the wrapped implementations ------------------------------------------------------------------

def _extend_mask(mask: Tensor | None, module: nn.Module, query: Tensor, key: Tensor, p: int,
                 is_causal: bool | None, base: str, valid: Tensor | None = None) -> Tensor | None:
    """The mask for keys [prefix (p), key (T_k)]; prefix columns visible to every query, or (routing) to
    the queries of the samples `valid` (B, p) marks."""
    t_q, t_k = query.shape[2], key.shape[2]
    if mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", base != "eager")
        if (not causal or t_q == 1) and valid is None:
            return None  # no mask: every query sees every key, prefix included
        i = torch.arange(t_q, device=query.device)[:, None]
        j = torch.arange(t_k, device=query.device)[None, :]
        mask = (j <= t_k - t_q + i)[None, None] if causal and t_q > 1 else \
            torch.ones((1, 1, t_q, t_k), dtype=torch.bool, device=query.device)  # (1, 1, T_q, T_k), bottom right
        if base == "eager":
            zero = torch.zeros((), dtype=query.dtype, device=query.device)
            mask = torch.where(mask, zero, torch.finfo(query.dtype).min)
    if valid is None:
        pad = mask.new_ones(*mask.shape[:-1], p) if mask.dtype == torch.bool else mask.new_zeros(*mask.shape[:-1], p)
        return torch.cat([pad, mask], dim=-1)  # (B | 1, H | 1, T_q, p + T_k)
    b = valid.shape[0]
    v = valid[:, None, None, :]  # (B, 1, 1, p)
    if mask.dtype != torch.bool:
        v = torch.where(v, torch.zeros((), dtype=mask.dtype, device=mask.device), torch.finfo(mask.dtype).min)
    mask = mask.expand(b, *mask.shape[1:])
    return torch.cat([v.expand(*mask.shape[:-1], p), mask], dim=-1)  # (B, H | 1, T_q, p + T_k)


def _padding_only(mask: Tensor | None) -> Tensor | None:
    """A causal mask (B | 1, 1, T_q, T_k) with the causal part dropped, the padding kept: the last query
    sees every real key, so its row is the padding mask of every row."""
    if mask is None:
        return None
    return mask[..., -1:, :].expand(mask.shape)


def _wrapper(base: str) -> Callable:
    def attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                  **kwargs: Any):
        hook = module.__dict__.get(ATTRIBUTE)
        if hook is not None and hook.bidirectional():
            attention_mask, kwargs["is_causal"] = _padding_only(attention_mask), False
        extra = hook.extra(key) if hook is not None else None
        if extra is not None:
            pk, pv, valid = extra  # (B, H_kv, P, D) each; (B, P) or None: which samples see which columns
            attention_mask = _extend_mask(attention_mask, module, query, key, pk.shape[2],
                                          kwargs.get("is_causal"), base, valid)
            bias = kwargs.get("position_bias")  # T5's relative position bias (B | 1, H, T_q, T_k)
            if isinstance(bias, Tensor) and bias.dim() == 4 and bias.shape[-1] == key.shape[2]:
                kwargs["position_bias"] = torch.cat([bias.new_zeros(*bias.shape[:-1], pk.shape[2]), bias], dim=-1)
            key, value = torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2)  # (B, H_kv, P + T_k, D)
        if base == "eager":
            if getattr(module, "reorder_and_upcast_attn", False) and hasattr(module, "_upcast_and_reordered_attn"):
                return module._upcast_and_reordered_attn(query, key, value, attention_mask)  # GPT-2's option
            return eager_attention(module)(module, query, key, value, attention_mask, **kwargs)
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        local = getattr(sys.modules.get(type(module).__module__), "ALL_ATTENTION_FUNCTIONS", ALL_ATTENTION_FUNCTIONS)
        return local[base](module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"{ATTENTION_WRAPPER}{base}_attention"
    return attention


def _mask_wrapper(base: str) -> Callable:
    def mask(*args: Any, **kwargs: Any):
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
        return ALL_MASK_ATTENTION_FUNCTIONS[base](*args, **kwargs)  # prefixes are added per layer
    return mask


def _register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    for base in ATTENTION_IMPLEMENTATIONS:
        if ATTENTION_WRAPPER + base not in AttentionInterface():
            AttentionInterface.register(ATTENTION_WRAPPER + base, _wrapper(base))
            AttentionMaskInterface.register(ATTENTION_WRAPPER + base, _mask_wrapper(base))


def _peers(config: Any) -> list["AttentionHook"]:
    """The installed hooks whose attention module uses `config`."""
    return [hook for module, hook in list(_HOOKS.items()) if getattr(module, "config", None) is config]


def _set_impl(config: Any, name: str | None) -> None:
    if hasattr(config, "_attn_implementation_internal"):
        config._attn_implementation_internal = name  # this config only, not its sub-configs
    else:
        config._attn_implementation = name


# ---- the hook -------------------------------------------------------------------------------------

class AttentionHook(Hook):
    """One attention module: its active components, and the switch of its config to the wrapper.

    The first hook on a config switches it to the wrapper and keeps the original name; the last one
    removed puts it back. Hooks sharing a config are found through a weak map of modules, so models
    dropped without detach leave nothing behind.
    """

    def install(self) -> None:
        module = self.point.module
        peers = _peers(module.config)
        if peers:
            self._original = peers[0]._original
        else:
            check_attention_point(self.point, "an attention component")
            _register()
            self._original = attention_implementation(module)
            _set_impl(module.config, ATTENTION_WRAPPER + base_implementation(self._original))
        _HOOKS[module] = self
        module.__dict__[ATTRIBUTE] = self

    def remove(self) -> None:
        module = self.point.module
        if _HOOKS.get(module) is self:
            del _HOOKS[module]
        if module.__dict__.get(ATTRIBUTE) is self:
            del module.__dict__[ATTRIBUTE]
        wrapped = ATTENTION_WRAPPER + base_implementation(self._original)
        if not _peers(module.config) and attention_implementation(module) == wrapped:
            _set_impl(module.config, self._original)  # exactly the original (a name set meanwhile stays)

    def bidirectional(self) -> bool:
        """Whether an active component drops the causal mask here (for every sample: inside route(), the
        samples' groups must agree)."""
        flags = {b.group for b in self.active() if b.module.bidirectional}
        route = self.adaptation.routing
        if route is None or not flags or None in flags:
            return bool(flags)
        if all(g in flags for g in route.groups):
            return True
        raise AdaptuneError(f"Bidirectional at {self.point.where()} is in some of the routed groups and not in "
                            f"others ({', '.join(sorted(map(str, flags)))} of {', '.join(map(str, route.groups))}); "
                            f"route causal and bidirectional samples in separate batches")

    def extra(self, key: Tensor) -> tuple[Tensor, Tensor, Tensor | None] | None:
        """The active extra keys and values for `key` (B, H_kv, T_k, D), concatenated in binding order:
        (B, H_kv, P, D) twice, and None, or inside route() the (B, P) columns each sample sees (the shared
        components' first, then its task's, padded to the longest task's); None if there are none."""
        context = self.adaptation.context
        kvs = {x: kv for x in self.active() if (kv := x.module.kv(context)) is not None}
        active = list(kvs)
        if not active:
            return None
        b, h, _, d = key.shape
        route = context.route
        shared = [x for x in active if route is None or x.group is None]
        parts = [self._rows(shared, kvs, b)] if shared else []
        valid = None
        tasks = [] if route is None else list(dict.fromkeys(x.group for x in active if x.group is not None))
        if tasks:
            per_task = {g: self._rows([x for x in active if x.group == g], kvs, b) for g in tasks}
            longest = max(k.shape[1] for k, _ in per_task.values())
            rows = route.rows_for(b, key.device, self.point.where())
            width = per_task[tasks[0]][0].shape[-1]
            packed = [key.new_zeros(b, longest, width, dtype=per_task[tasks[0]][0].dtype) for _ in range(2)]
            seen = torch.zeros(b, longest, dtype=torch.bool, device=key.device)
            for g, (k, v) in per_task.items():
                r = rows.get(route.names.index(g))
                if r is None or not r.numel():
                    continue
                pad = longest - k.shape[1]
                packed = [out.index_copy(0, r, F.pad(t.index_select(0, r), (0, 0, 0, pad)))
                          for out, t in zip(packed, (k, v))]
                seen[r, :k.shape[1]] = True
            parts.append((packed[0], packed[1]))
            shared_cols = parts[0][0].shape[1] if shared else 0
            valid = torch.cat([seen.new_ones(b, shared_cols), seen], dim=1)  # (B, P)
        out = []
        for part in zip(*parts):
            x = torch.cat(part, dim=1).to(key.dtype)  # (B, P, H_kv·D)
            out.append(x.view(b, -1, h, d).transpose(1, 2))  # (B, H_kv, P, D)
        return out[0], out[1], valid

    def _rows(self, bindings: list, kvs: dict, b: int) -> tuple[Tensor, Tensor]:
        """The bindings' extra keys and values (`kvs`: binding -> its module's kv()) for every sample,
        concatenated: (B, n, H_kv·D) twice."""
        pairs = [_batched(kvs[x], b, x, self.adaptation.conditioning) for x in bindings]
        return torch.cat([k for k, _ in pairs], dim=1), torch.cat([v for _, v in pairs], dim=1)


def _batched(kv: tuple[Tensor, Tensor], b: int, bound: Any, condition: Any) -> tuple[Tensor, Tensor]:
    """(n, H_kv·D) rows for every sample, or (B', n, H_kv·D) per sample, as (B, n, H_kv·D): B' = B, or inside
    generate() a divisor of B (its beams and returned sequences repeat each sample, as repeat_interleave);
    `condition`: the adaptation's Condition (hooks/condition.py), which knows whether generate() runs."""
    out = []
    for x in kv:
        if x.dim() == 2:
            x = x.unsqueeze(0).expand(b, -1, -1)
        elif x.shape[0] != b:
            where = f"{type(bound.module).__name__} at {bound.point.where()}"
            if condition is None or condition.latent.shape[0] != x.shape[0]:
                raise AdaptuneError(f"{where}: the latent has {x.shape[0]} samples, the batch {b}; give one latent "
                                    f"per sample")
            x = x.repeat_interleave(condition.factor(b, where), dim=0)
        out.append(x)
    return out[0], out[1]
