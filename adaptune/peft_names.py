"""How a PEFT adapter's names map onto this model: module paths (exact, else the one unique suffix match) and
PEFT's rank_pattern / alpha_pattern lookups (used by peft_import and peft_experts)."""
from __future__ import annotations

import re
from typing import Any

from torch import nn

from .errors import LoadError
from .peft_export import CONFIG_NAME
from .points import is_linear


def matches(peft_path: str, modules: dict[str, nn.Module]) -> list[str]:
    """The module paths of this model a PEFT module path may name: itself, else every suffix match."""
    if peft_path in modules:
        return [peft_path]
    return [n for n in modules if n.endswith("." + peft_path) or peft_path.endswith("." + n)]


def find_module(peft_path: str, modules: dict[str, nn.Module], model_name: str) -> str:
    """The module path of this model for a PEFT module path: exact, else the one unique suffix match."""
    found = matches(peft_path, modules)
    if not found:
        examples = [n for n, m in modules.items() if is_linear(m)][:3]
        raise LoadError(f"PEFT module {peft_path!r} matches no module of this {model_name} "
                        f"(its Linear / Conv1D modules are named like {', '.join(map(repr, examples))})")
    if len(found) > 1:
        raise LoadError(f"PEFT module {peft_path!r} is ambiguous in this {model_name}: it could be "
                        f"{', '.join(map(repr, found[:5]))}")
    return found[0]


def pattern_value(patterns: dict[str, Any] | None, name: str, default: Any, what: str) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key k with `(.*\\.)?(k)$` matching name."""
    for key, value in (patterns or {}).items():
        try:
            if re.match(rf"(.*\.)?({key})$", name):
                return value
        except re.error as e:
            raise LoadError(f"{CONFIG_NAME}: {what} key {key!r} is not a valid pattern: {e}") from e
    return default
