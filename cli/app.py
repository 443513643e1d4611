"""`adaptune inspect` and `adaptune info`: parse, call adaptune, render with rich."""
from __future__ import annotations

import platform

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="adaptune: composable parameter-efficient fine-tuning.", no_args_is_help=True,
                  add_completion=False)
console = Console()


def _fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(2)


@app.command()
def inspect(model: str = typer.Argument(..., help="minilm, gpt2-tiny, bert-tiny, gpt2-small, bert-base or a local model dir"),
            spec: str = typer.Option(None, "--spec", help="components to attach, e.g. 'attn=LoRA(12)|Prefix(10); ffn=Adapter(64)'")) -> None:
    """Print a model's sites with their modules and parameter counts (and what SPEC would add)."""
    from adaptune import AdaptuneError, attach
    from adaptune.models import load_model
    from adaptune.sites import SiteMap
    from adaptune.spec import parse_spec

    try:
        base = load_model(model)
        plan = parse_spec(spec) if spec else None
    except AdaptuneError as e:
        return _fail(str(e))
    sites = SiteMap(base)
    total = sum(p.numel() for p in base.parameters())
    console.print(f"[bold]{type(base).__name__}[/bold] (model_type {sites.model_type!r}): "
                  f"{sites.n_layers} layers, {total:,} parameters")
    rows = sites.table()
    if rows:
        table = Table("site", "modules", "layers", "params / layer")
        for site, paths, layers, per in rows:
            table.add_row(site, paths, str(layers or "-"), f"{per:,}")
        console.print(table)
    else:
        console.print(f"no site map for {sites.model_type!r}: select modules by path, e.g. {sites._example_path()!r}")
    if plan:
        try:
            adaptation = attach(base, plan)
        except AdaptuneError as e:
            return _fail(str(e))
        c = adaptation.counts()
        console.print(f"with {spec}: [bold]{c.shared:,}[/bold] trainable parameters, "
                      f"{c.pct_trainable():.3f}% of the base")


@app.command()
def info() -> None:
    """Versions, devices, and which path each op runs on."""
    import torch
    import transformers

    import adaptune

    table = Table("component", "version / state")
    table.add_row("adaptune", adaptune.__version__)
    table.add_row("python", platform.python_version())
    table.add_row("torch", torch.__version__)
    table.add_row("transformers", transformers.__version__)
    table.add_row("cuda", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available")
    console.print(table)
    ops = Table("op", "device", "path")
    for op in ("lora", "dora", "bottleneck"):
        ops.add_row(op, "cpu", "reference (pure PyTorch)")
    console.print(ops)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
