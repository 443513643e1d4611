"""What every command shares: the console, the one-line error exit, the command line as typed."""
from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console

console = Console()


def fail(message: str) -> None:
    """One line, 'error: MESSAGE', and exit status 2: the message is printed as is (no rich markup, no wrapping)."""
    from rich.markup import escape
    console.print(f"[red]error:[/red] {escape(' '.join(str(message).split()))}", soft_wrap=True, highlight=False)
    raise typer.Exit(2)


def command_line(ctx: typer.Context) -> str:
    """The command as typed (console script), else rebuilt from the options that differ from defaults."""
    import shlex

    if Path(sys.argv[0]).name == "adaptune":
        return shlex.join(["adaptune", *sys.argv[1:]])
    names, c = [], ctx
    while c.parent is not None:  # the subcommand path, e.g. run vae
        names.insert(0, c.info_name or "")
        c = c.parent
    parts = ["adaptune", *names]
    for p in ctx.command.params:
        v = ctx.params.get(p.name)
        if v is None or v == p.default or (v is False and not p.secondary_opts):
            continue
        if isinstance(v, bool):
            parts.append(max(p.opts, key=len) if v else max(p.secondary_opts, key=len))
        else:
            parts += [max(p.opts, key=len), str(v)]
    return shlex.join(parts)
