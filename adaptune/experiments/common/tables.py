"""Tables every experiment's report builds alike, from a header and rows of cells: on the terminal (rich) and as
markdown."""
from __future__ import annotations

from rich.table import Table


def table(head: list[str], body: list[list[str]], title: str, columns: tuple[str, ...] | None = None) -> Table:
    """A rich table of `body` (rows under `head`), only `columns` of them if given."""
    keep = [head.index(k) for k in columns] if columns else list(range(len(head)))
    out = Table(*[head[i] for i in keep], title=title)
    for row in body:
        out.add_row(*[row[i] for i in keep])
    return out


def markdown(head: list[str], body: list[list[str]]) -> str:
    """A markdown table of `body` (rows under `head`); '|' inside a cell is escaped (stacks hold it)."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in body]
    return "\n".join(lines) + "\n"
