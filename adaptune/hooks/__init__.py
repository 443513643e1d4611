"""Hooks route a model's forward through the components bound to it, one hook per model place."""
from ..points import ATTENTION, EMBED, MODULE, PROJECTION, SUBLAYER
from .base import Binding, Hook
from .module import ModuleHook
from .projection import ProjectionHook
from .sublayer import SublayerHook


def hook_class(kind: str) -> type[Hook]:
    """The hook for points of `kind`."""
    if kind == ATTENTION:
        from .attention import PrefixHook
        return PrefixHook
    if kind == EMBED:
        from .embed import PromptHook
        return PromptHook
    return {PROJECTION: ProjectionHook, SUBLAYER: SublayerHook, MODULE: ModuleHook}[kind]


__all__ = ["Binding", "Hook", "ModuleHook", "ProjectionHook", "hook_class"]
