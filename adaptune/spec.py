"""Parse compositions written as text: `attn=LoRA(12)|Prefix(10); ffn=Adapter(64)`.

Only component names and literal arguments are accepted (parsed with `ast`, never evaluated).
"""
from __future__ import annotations

import ast

from .components.base import REGISTRY, Component, Stack
from .errors import ConfigError


def parse_component(text: str) -> Component:
    """`LoRA(12, alpha=24)` -> LoRA(r=12, alpha=24)."""
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as e:
        raise ConfigError(f"cannot parse component {text!r}: {e.msg}") from e
    if isinstance(node, ast.Name):
        node = ast.Call(func=node, args=[], keywords=[])
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        raise ConfigError(f"a component is written Name(args), e.g. LoRA(12); got {text!r}")
    name = node.func.id
    names = [k.arg for k in node.keywords]
    if None in names:
        raise ConfigError(f"{text!r}: write arguments out (name=value); **kwargs is not accepted")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"{text!r} gives {', '.join(repeated)} more than once; give each argument once")
    if name not in REGISTRY:
        raise ConfigError(f"unknown component {name!r} in {text!r}; known: {', '.join(sorted(REGISTRY))}")
    try:
        args = [ast.literal_eval(a) for a in node.args]
        kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    except ValueError as e:
        raise ConfigError(f"arguments of {text!r} must be literals (numbers, strings, True/False/None)") from e
    try:
        return REGISTRY[name](*args, **kwargs)
    except TypeError as e:
        raise ConfigError(f"bad arguments in {text!r}: {e}") from e


def parse_stack(text: str) -> Stack:
    return Stack(*(parse_component(part) for part in text.split("|")))


def parse_spec(text: str) -> dict[str, Stack]:
    """`attn=LoRA(12)|Prefix(10); ffn=Adapter(64)` -> {"attn": Stack, "ffn": Stack}."""
    if not isinstance(text, str):
        raise ConfigError(f"a spec is text such as 'attn=LoRA(12)|Prefix(10); ffn=Adapter(64)', "
                          f"got {type(text).__name__}: {text!r}")
    out: dict[str, Stack] = {}
    for item in filter(None, (s.strip() for s in text.split(";"))):
        selector, eq, stack = item.partition("=")
        if not eq or not selector.strip():
            raise ConfigError(f"write each site as selector=Stack, e.g. 'attn=LoRA(12)'; got {item!r}")
        if selector.strip() in out:
            raise ConfigError(f"selector {selector.strip()!r} appears twice in {text!r}; stack its components "
                              f"with '|' instead ({selector.strip()}=LoRA(4)|Adapter(8))")
        out[selector.strip()] = parse_stack(stack)
    if not out:
        raise ConfigError(f"empty spec {text!r}; e.g. 'attn=LoRA(12)|Prefix(10); ffn=Adapter(64)'")
    return out


def format_spec(spec: dict[str, Stack]) -> str:
    """The inverse of parse_spec (with every argument written out)."""
    return "; ".join(f"{sel}={'|'.join(map(repr, Stack(stack)))}" for sel, stack in spec.items())
