"""Hooks route a model's forward through the components bound to it, one hook per model place."""
from ..sites import ATTENTION, EMBED, PROJECTION, SUBLAYER
from .base import Hook
from .projection import ProjectionHook
from .sublayer import SublayerHook


def hook_key(role: str, point) -> tuple:
    if role == SUBLAYER:
        return role, id(point.in_module), id(point.out_module)
    if role == EMBED:
        return role, id(point.model)
    return role, id(point.module)


def hook_class(role: str) -> type[Hook]:
    if role == ATTENTION:
        from .attention import PrefixHook
        return PrefixHook
    if role == EMBED:
        from .embed import PromptHook
        return PromptHook
    return {PROJECTION: ProjectionHook, SUBLAYER: SublayerHook}[role]


__all__ = ["Hook", "hook_class", "hook_key"]
