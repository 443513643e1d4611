"""CLI options generated from config dataclasses, so each default and help text is written once, on the field.

A field becomes an option when its metadata has "help"; "flags" (e.g. ("--per-task/--shared",)) replaces
the default `--field-name`, "metavar" and "panel" (the rich help panel) shape the help. `X | None` fields
take X with default None; `tuple[str, ...]` fields take one comma-separated string. A field named in CHECKS
(`device`) is checked as the option is parsed, the same way for every command that has it.
"""
from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from typing import Any, Callable

import typer

from adaptune.errors import AdaptuneError

from .common import fail


def _check_device(device: Any) -> str:
    from adaptune.experiments.common.config import check_device  # imports torch: when an option is parsed
    return check_device(device)


CHECKS: dict[str, Callable[[Any], Any]] = {"device": _check_device}  # field name -> its check (AdaptuneError)


@dataclasses.dataclass(frozen=True)
class ConfigOption:
    """One generated option: its parameter name, the field it fills and how the CLI value converts."""
    param: str  # the keyword the command function receives
    owner: type  # the dataclass holding the field
    field: str
    kind: type  # str, int, float, bool or tuple (comma-separated)
    default: Any  # as the CLI sees it (a tuple default joined with ",")
    info: Any  # the typer.Option

    def value(self, raw: Any) -> Any:
        """The field value for the CLI value `raw`."""
        return tuple(raw.split(",")) if self.kind is tuple and raw is not None else raw


def _kind(hint: Any, where: str) -> type:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]  # X | None
    if typing.get_origin(hint) is tuple:
        return tuple
    if hint in (str, int, float, bool):
        return hint
    raise TypeError(f"{where}: a CLI option needs a str, int, float, bool or tuple[str, ...] field, got {hint!r}")


def options(cls: type, panel: str = "Options") -> list[ConfigOption]:
    """The options of the fields of `cls` that have help metadata, in field order."""
    hints = typing.get_type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "help" not in meta:
            continue
        kind = _kind(hints[f.name], f"{cls.__name__}.{f.name}")
        flags = tuple(meta.get("flags", (f"--{f.name.replace('_', '-')}",)))
        param = flags[0].split("/")[0].lstrip("-").replace("-", "_")
        if f.default is dataclasses.MISSING:
            raise TypeError(f"{cls.__name__}.{f.name}: a CLI option needs a plain default (not a factory)")
        default = ",".join(f.default) if kind is tuple else f.default
        info = typer.Option(default, *flags, help=meta["help"], metavar=meta.get("metavar"),
                            rich_help_panel=meta.get("panel", panel), callback=_checked(CHECKS.get(f.name)))
        found.append(ConfigOption(param, cls, f.name, kind, default, info))
    return found


def _checked(check: Callable[[Any], Any] | None) -> Callable[[Any], Any] | None:
    """A typer callback running `check` on the value: its AdaptuneError is the command's one-line error."""
    if check is None:
        return None

    def callback(value: Any) -> Any:
        try:
            return check(value)
        except AdaptuneError as e:
            fail(str(e))
    return callback


def with_options(func: Callable, opts: list[ConfigOption]) -> Callable:
    """`func` (which takes the generated options as **values) with a signature typer reads: its positional
    parameters, one keyword-only typer.Option per generated option, then its own keyword-only ones."""
    own = [p for p in inspect.signature(func).parameters.values() if p.kind is not p.VAR_KEYWORD]
    taken = {p.name for p in own}
    for o in opts:
        if o.param in taken:
            raise TypeError(f"two CLI options named {o.param!r} ({o.owner.__name__}.{o.field})")
        taken.add(o.param)
    generated = [inspect.Parameter(o.param, inspect.Parameter.KEYWORD_ONLY, default=o.info,
                                   annotation=str if o.kind is tuple else o.kind) for o in opts]
    first = [p for p in own if p.kind is not p.KEYWORD_ONLY]
    last = [p for p in own if p.kind is p.KEYWORD_ONLY]
    func.__signature__ = inspect.signature(func).replace(parameters=[*first, *generated, *last])
    return func


def fields_of(cls: type, opts: list[ConfigOption], values: dict) -> dict:
    """{field: value} of `cls` from the command's keyword values."""
    return {o.field: o.value(values[o.param]) for o in opts if o.owner is cls}
