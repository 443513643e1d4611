"""Components and the Stack that composes them with `|`.

A component is plain data (a frozen dataclass of constructor arguments). It names the kind of point
it acts on (`kind`) and builds its modules when bound (what their hooks call: contract.py). `a | b | c` makes a flat, ordered Stack that
serialises to JSON and back.
"""
from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

from torch import nn

from ..errors import ConfigError
from ..points import Point

if TYPE_CHECKING:
    from .contract import SharedContext

REGISTRY: dict[str, type["Component"]] = {}



class Component:
    """Base of every component. Subclasses are frozen dataclasses."""

    kind: ClassVar[str]  # the kind of point it binds to (points.KINDS): what its hook is

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        REGISTRY[cls.__name__] = cls

    def __or__(self, other: "Component | Stack") -> "Stack":
        return Stack(self) | other

    def __ror__(self, other: "Component | Stack") -> "Stack":
        return Stack(other) | self

    def to_dict(self) -> dict[str, Any]:
        return {"type": type(self).__name__, **dataclasses.asdict(self)}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> "Component":
        if not isinstance(data, dict):
            raise ConfigError(f"a component is a dict such as {{'type': 'LoRA', 'r': 8}}, got {data!r}")
        data = dict(data)
        name = data.pop("type", None)
        if not isinstance(name, str) or name not in REGISTRY:
            raise ConfigError(f"unknown component type {name!r}; known: {', '.join(sorted(REGISTRY))}")
        cls = REGISTRY[name]
        fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set(data)
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ConfigError(f"{name} has no argument(s) {', '.join(unknown)}; its arguments: {', '.join(sorted(fields))}")
        return cls(**data)

    def shared(self, ctx: "SharedContext") -> nn.Module | None:
        """A module shared by all sites this component binds to (e.g. a hypernetwork); None if none."""
        return None

    def bind(self, point: Point, shared: nn.Module | None) -> nn.Module:
        """Build the module that acts at one concrete point of the model: it implements the Protocol of the
        component's kind in contract.py, which is all its hook calls."""
        raise NotImplementedError


def check_positive(name: str, value: Any, kind: type | tuple[type, ...] = int) -> None:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) or value <= 0:
        label = "integer" if kinds == (int,) else "finite number"
        raise ConfigError(f"{name} must be a positive {label}, got {value!r}")


def check_choice(name: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, valid))}; got {value!r}")


def check_dropout(value: Any) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ConfigError(f"dropout must be a float in [0, 1), got {value!r}")


class Stack:
    """An ordered, flat collection of components for one site: `LoRA(12) | Prefix(30)`."""

    def __init__(self, *items: "Component | Stack") -> None:
        flat: list[Component] = []
        for item in items:
            if isinstance(item, Stack):
                flat.extend(item.components)
            elif isinstance(item, Component):
                flat.append(item)
            else:
                raise ConfigError(f"a stack holds components, got {type(item).__name__}: {item!r}")
        self.components: tuple[Component, ...] = tuple(flat)

    def __or__(self, other: "Component | Stack") -> "Stack":
        return Stack(self, other)

    def __iter__(self) -> Iterator[Component]:
        return iter(self.components)

    def __len__(self) -> int:
        return len(self.components)

    def __getitem__(self, i: int) -> Component:
        return self.components[i]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Stack) and self.components == other.components

    def __hash__(self) -> int:
        return hash(self.components)

    def __repr__(self) -> str:
        return " | ".join(map(repr, self.components)) if self.components else "Stack()"

    def to_dict(self) -> list[dict[str, Any]]:
        return [c.to_dict() for c in self.components]

    @staticmethod
    def from_dict(data: list[dict[str, Any]]) -> "Stack":
        if not isinstance(data, (list, tuple)):
            raise ConfigError(f"a stack is a list of component dicts, got {data!r}")
        return Stack(*(Component.from_dict(d) for d in data))
