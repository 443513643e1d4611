"""Hooks route a model's forward through the components bound to it, one hook per model place."""
from ..points import ATTENTION, EMBED, EXPERTS, MODULE, PROJECTION, SUBLAYER, Point, is_table
from .base import Binding, Hook
from .experts import ExpertsHook
from .lookup import LookupHook
from .module import ModuleHook
from .projection import ProjectionHook
from .sublayer import SublayerHook


def hook_class(point: Point) -> type[Hook]:
    """The hook for `point`: by its kind (a projection on an embedding table: the lookup hook)."""
    kind = point.kind
    if kind == PROJECTION and is_table(point.module):
        return LookupHook
    if kind == ATTENTION:
        from .attention import AttentionHook
        return AttentionHook
    if kind == EMBED:
        from .embed import PromptHook
        return PromptHook
    return {PROJECTION: ProjectionHook, SUBLAYER: SublayerHook, MODULE: ModuleHook, EXPERTS: ExpertsHook}[kind]


__all__ = ["Binding", "ExpertsHook", "Hook", "LookupHook", "ModuleHook", "ProjectionHook", "hook_class"]
