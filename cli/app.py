"""The adaptune CLI (inspect, info, run multitask | vae | fewshot, tapt, report, bench): parse, call adaptune, render with rich.

`run multitask`'s options are generated from the fields of Method and ExperimentConfig (cli/options.py)."""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import typer
from rich.table import Table

from adaptune.experiments.common.methods import Method
from adaptune.experiments.multitask.config import ExperimentConfig

from .common import command_line, console, fail, progress, set_threads
from .fewshot import FEWSHOT_OPTIONS, TAPT_OPTIONS, run_fewshot, run_tapt
from .options import fields_of, options, with_options
from .vae import PRETRAIN_OPTIONS, VAE_OPTIONS, pretrain_lm, run_vae, vae_app

app = typer.Typer(help="adaptune: composable parameter-efficient fine-tuning.", no_args_is_help=True,
                  add_completion=False)


@app.command()
def inspect(model: str = typer.Argument(..., help="minilm, gpt2-tiny, bert-tiny, gpt2-small, bert-base or a local model dir"),
            spec: str = typer.Option(None, "--spec", help="components to attach, e.g. 'attn=LoRA(12)|Prefix(10); ffn=Adapter(64)'")) -> None:
    """Print a model's sites with their modules and parameter counts (and what SPEC would add)."""
    from adaptune import AdaptuneError, attach
    from adaptune.experiments.common.encoders import load_base
    from adaptune.sites import SiteMap
    from adaptune.spec import parse_spec

    try:
        base = load_base(model, seed=0)  # a preset, a model directory (with its config.json), a cached hub name
        plan = parse_spec(spec) if spec else None
    except AdaptuneError as e:
        return fail(str(e))
    sites = SiteMap(base)
    layers = (" + ".join(f"{len(s.layers)} {s.name}" for s in sites.towers) if len(sites.towers) > 1
              else str(sites.n_layers))
    total = sum(p.numel() for p in base.parameters())
    console.print(f"[bold]{type(base).__name__}[/bold] (model_type {sites.model_type!r}): "
                  f"{layers} layers, {total:,} parameters")
    rows = sites.table()
    if rows:
        table = Table("site", "modules", "layers", "params / layer")
        for site, paths, layers, per in rows:
            table.add_row(site, paths, str(layers or "-"), f"{per:,}")
        console.print(table)
    else:
        console.print(f"no site map for {sites.model_type!r}: select modules by path, e.g. {sites.example_path()!r}")
    if plan:
        try:
            adaptation = attach(base, plan)
        except AdaptuneError as e:
            return fail(str(e))
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
    from adaptune import AdaptuneError, ops

    try:
        mode = ops.mode()
    except AdaptuneError as e:
        return fail(str(e))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    paths = Table("op", "device", "path", "why", title=f"ops (ADAPTUNE_KERNELS mode: {mode})")
    for op in ops.OPS:
        for device in devices:
            kind, why = ops.path(op, device)
            paths.add_row(op, device, kind if kind == "kernel" else "reference (pure PyTorch)", why)
    console.print(paths)
    console.print("kernel: the compiled extension (csrc/); reference: adaptune/ops/reference.py, the fallback. "
                  "Switch with ADAPTUNE_KERNELS=auto|off|require.")


run_app = typer.Typer(help="Evaluation runs (experiments) of the papers.", no_args_is_help=True)
app.add_typer(run_app, name="run")


MULTITASK_OPTIONS = options(Method, panel="Method") + options(ExperimentConfig)  # Method's fields, then the config's


def multitask_config(values: dict, command: str = "") -> ExperimentConfig:
    """The ExperimentConfig of `run multitask`'s generated option values (keyed by parameter name)."""
    method = Method(**fields_of(Method, MULTITASK_OPTIONS, values))
    return ExperimentConfig(method=method, command=command, **fields_of(ExperimentConfig, MULTITASK_OPTIONS, values))


def run_multitask(ctx: typer.Context, *,
                  threads: int = typer.Option(1, help="torch CPU threads; 1 is the fastest on a busy shared machine "
                                                      "(more threads than free cores stall)", rich_help_panel="Run"),
                  **values) -> None:
    """Multitask fine-tuning (SST-5, Quora paraphrase, STS by default) and dev evaluation."""
    from adaptune import AdaptuneError
    from adaptune.experiments.multitask.report import run_table
    from adaptune.experiments.multitask.run import run

    set_threads(threads)
    try:
        cfg = multitask_config(values, command=command_line(ctx))
        if os.environ.get("RANK", "0") != "0":  # under torchrun: rank 0 shows progress, prints and saves
            run(cfg)
            return None
        with progress() as bars:
            result = run(cfg, bars)
    except AdaptuneError as e:
        return fail(str(e))
    console.print(run_table(result))
    console.print(f"saved to {result['run_dir']}/ (results.json, {', '.join(sorted(result['files'].values()))})")


run_app.command("multitask")(with_options(run_multitask, MULTITASK_OPTIONS))

run_app.command("vae")(with_options(run_vae, VAE_OPTIONS))
run_app.command("fewshot")(with_options(run_fewshot, FEWSHOT_OPTIONS))
app.command("tapt")(with_options(run_tapt, TAPT_OPTIONS))
app.add_typer(vae_app, name="vae")
app.command("pretrain-lm")(with_options(pretrain_lm, PRETRAIN_OPTIONS))


@app.command()
def report(runs: list[Path] = typer.Argument(..., help="run directories, e.g. runs/*"),
           plot: Path = typer.Option(Path("runs/report.png"), help="PNG of dev average vs % params updated per task "
                                     "(multitask runs); VAE runs get <plot>-vae-lambda.png (metrics against λ) "
                                     "and <plot>-vae-curves.png (training curves) beside it"),
           markdown: Path = typer.Option(None, help="also write the tables as markdown here")) -> None:
    """Tables across runs: multitask runs (and a plot of dev average vs % trainable parameters), VAE runs
    (and plots of the metrics against λ and of the training curves), few-shot runs (test accuracy over seeds)."""
    from adaptune import AdaptuneError
    from adaptune.experiments.reports import find_runs, load_results, report as tables_and_plots
    from adaptune.files import atomic_write
    from rich.markup import escape

    for option, path in (("--plot", plot), ("--markdown", markdown)):
        if path is not None and path.is_dir():
            return fail(f"{option} {str(path)!r} is a directory; give a file path, e.g. {path / 'report'}"
                        f"{'.png' if option == '--plot' else '.md'}")
    found, skipped = find_runs(runs)
    for line in skipped:
        console.print(f"[yellow]skipped[/yellow] {escape(line)}")
    if not found:
        return fail("no finished runs (directories with a results.json) among the paths given; e.g. adaptune report runs/*")
    try:
        written, text = tables_and_plots(load_results(found), plot, show=console.print)
        if markdown:
            atomic_write(markdown, lambda tmp: tmp.write_text(text))
    except AdaptuneError as e:
        return fail(str(e))
    if written:
        console.print(f"plot{'s' if len(written) > 1 else ''}: {', '.join(map(str, written))}")
    if markdown:
        console.print(f"markdown: {markdown}")


def _benchmarks():
    """The checkout's benchmarks/ (a development directory, never installed), from the current directory."""
    here = Path.cwd()
    if not (here / "benchmarks" / "run.py").is_file():
        fail(f"adaptune bench runs from a checkout of adaptune: {here} has no benchmarks/run.py "
              f"(cd to the checkout, or run python -m benchmarks there)")
    if str(here) not in sys.path:
        sys.path.insert(0, str(here))
    from benchmarks import report, run
    return report, run


@app.command()
def bench(out: Path = typer.Option(..., "--out", help="results directory, e.g. benchmarks/results"),
          suite: str = typer.Option("all", "--suite", help="train, ops, sweep, routing, quantized, experts or all"),
          device: str = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)"),
          quick: bool = typer.Option(False, "--quick", help="fewer runs, ranks and sizes: a rough look")) -> None:
    """Time training steps, ops and a rank sweep side by side with Hugging Face PEFT; check the targets
    (from a checkout of adaptune)."""
    bench_report, bench_run = _benchmarks()
    if suite not in (*bench_run.SUITES, "all"):
        return fail(f"unknown suite {suite!r}; give one of {', '.join(bench_run.SUITES)} or all")
    device = device or bench_run.default_device()
    if device not in ("cpu", "cuda"):
        return fail(f"unknown device {device!r}; give cpu or cuda")
    from adaptune import AdaptuneError
    from adaptune.experiments.common.config import check_device
    try:
        check_device(device)
    except AdaptuneError as e:
        return fail(str(e))

    def log(line: str) -> None:
        console.print(line, markup=False, highlight=False)

    for name in bench_run.SUITES if suite == "all" else [suite]:
        result = bench_run.run_suite(name, device, quick=quick, out=out, log=log)
        heads, rows = bench_report.table(result)
        table = Table(*heads, title=f"{result['suite']} on {device} ({result['environment']['device_name']})")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    verdicts = Table("verdict", "target", "measured", "value", "limit", title=f"targets on {device}")
    for r in bench_run.check_targets(device, out=out, log=lambda line: None):
        colour = {"PASS": "green", "FAIL": "red"}.get(r["verdict"], "yellow")
        value = f"{r['value']:.3f}" if "value" in r else r.get("why", "")
        limit = f"{'≥' if r.get('at_least') else '≤'} {r['limit']}" if "limit" in r else ""
        verdicts.add_row(f"[{colour}]{r['verdict']}[/{colour}]", r["target"], r.get("a", ""), value, limit)
    console.print(verdicts)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
