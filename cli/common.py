"""What every command shares: the console, the one-line error exit, the command line as typed, the torch thread
setting of --threads and the progress bars."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

if TYPE_CHECKING:
    from rich.progress import Progress

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


def set_threads(threads: int) -> None:
    """--threads: torch's CPU threads for the command; below 1, the one-line error exit."""
    if threads < 1:
        fail(f"--threads must be at least 1, got {threads}")
    import torch
    torch.set_num_threads(threads)


def progress() -> Progress:
    """The commands' progress bars: description, bar, done/total, time elapsed and remaining."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console)
