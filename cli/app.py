"""`adaptune inspect` and `adaptune info`: parse, call adaptune, render with rich."""
from __future__ import annotations

import platform
import sys
from pathlib import Path

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
        console.print(f"no site map for {sites.model_type!r}: select modules by path, e.g. {sites.example_path()!r}")
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
    from adaptune import AdaptuneError, ops

    try:
        mode = ops.mode()
    except AdaptuneError as e:
        return _fail(str(e))
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


def _command_line(ctx: typer.Context) -> str:
    """The command as typed (console script), else rebuilt from the options that differ from defaults."""
    import shlex
    import sys

    if Path(sys.argv[0]).name == "adaptune":
        return shlex.join(["adaptune", *sys.argv[1:]])
    parts = ["adaptune", "run", ctx.info_name or "multitask"]
    for p in ctx.command.params:
        v = ctx.params.get(p.name)
        if v is None or v == p.default or v is False:
            continue
        flag = max(p.opts, key=len)
        parts += [flag] if v is True else [flag, str(v)]
    return shlex.join(parts)


@run_app.command("multitask")
def run_multitask(
    ctx: typer.Context,
    method: str = typer.Option(None, help="head-only, full, lora, dora, adapter, lora+adapter (default), hyper, prefix, prompt, stack"),
    r: int = typer.Option(12, "--r", help="LoRA/DoRA rank (lora, dora, lora+adapter)"),
    dim: int = typer.Option(64, "--dim", help="adapter / hyper-adapter bottleneck (adapter, lora+adapter, hyper)"),
    n: int = typer.Option(20, "--n", help="prefix / prompt length (prefix, prompt)"),
    stack: str = typer.Option(None, help="any composition, e.g. 'attn=LoRA(12)|Prefix(10); ffn=Adapter(64)' (method 'stack')"),
    per_task: bool = typer.Option(None, "--per-task/--shared", help="per-task or shared components (default: the method's, as seed 004)"),
    model: str = typer.Option("minilm", help="minilm (all-MiniLM-L6-v2), a local Hugging Face BERT/GPT-2 directory, or a cached hub name"),
    tokenizer: str = typer.Option(None, help="tokenizer directory or hub name (default: the model's)"),
    tasks: str = typer.Option("sst,para,sts", help="datasets, comma-separated: sst, para (quora), sts, cfimdb; GLUE: sst2, stsb, mrpc, qqp, cola, rte, wnli, qnli, mnli"),
    data_dir: Path = typer.Option(None, help="default: $ADAPTUNE_DATA, else ../shared/data/cs224n"),
    quick: bool = typer.Option(False, "--quick", help="1 epoch on 512 train / 400 dev examples per dataset, batches of 16, at most 64 tokens"),
    epochs: int = typer.Option(None, help="default 3 (1 with --quick)"),
    train_limit: int = typer.Option(None, help="train examples per dataset, a seeded subset (default all; 512 with --quick)"),
    dev_limit: int = typer.Option(None, help="dev examples per dataset, a seeded subset (default all; 400 with --quick)"),
    max_length: int = typer.Option(None, help="tokens per example or pair (default 128; 64 with --quick)"),
    batch_size: int = typer.Option(None, help="default 32 (16 with --quick)"),
    lr: float = typer.Option(None, help="learning rate of the base or components (default: full 1e-4, prefix 5e-3, prompt 1e-2, others 1e-3)"),
    head_lr: float = typer.Option(3e-3, help="learning rate of the per-dataset heads"),
    layer_lr_decay: float = typer.Option(None, help="layer-wise learning-rate decay xi in (0, 1]: layer l gets lr*xi^(L-1-l) (seed 003)"),
    split_ratio: float = typer.Option(0.8, help="train share of quora-dev.csv, split by --data-seed (the rest is dev)"),
    augment: str = typer.Option(None, help="'eda': random insertion, swap, deletion; synonym replacement with --synonyms (seed 002)"),
    n_aug: int = typer.Option(1, help="EDA copies per training example"),
    synonyms: Path = typer.Option(None, help="synonym list for EDA: 'word syn1,syn2' per line"),
    seed: int = typer.Option(0, help="initialisation, batch order, dropout, EDA"),
    data_seed: int = typer.Option(0, help="the quora train/dev split and the subsets"),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N"),
    threads: int = typer.Option(1, help="torch CPU threads; 1 is the fastest on a busy shared machine (more threads than free cores stall)"),
    name: str = typer.Option(None, help="run name (default from method and seed)"),
    out: Path = typer.Option(Path("runs"), help="runs are written to OUT/NAME"),
) -> None:
    """Multitask fine-tuning (SST-5, Quora paraphrase, STS by default) and dev evaluation."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from adaptune import AdaptuneError
    from adaptune.experiments.methods import Method
    from adaptune.experiments.multitask import ExperimentConfig, run
    from adaptune.experiments.report import run_table

    if threads < 1:
        return _fail(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)
    if stack and method not in (None, "stack"):
        return _fail(f"--stack gives the composition of method 'stack'; drop --method {method} or --stack")
    try:
        m = Method(method or ("stack" if stack else "lora+adapter"), r=r, dim=dim, n=n, stack=stack, per_task=per_task)
        cfg = ExperimentConfig(
            method=m, model=model, tokenizer=tokenizer, tasks=tuple(tasks.split(",")),
            data_dir=str(data_dir) if data_dir else None, quick=quick, epochs=epochs, train_limit=train_limit,
            dev_limit=dev_limit, max_length=max_length, batch_size=batch_size, lr=lr, head_lr=head_lr,
            layer_lr_decay=layer_lr_decay, split_ratio=split_ratio, augment=augment, n_aug=n_aug,
            synonyms=str(synonyms) if synonyms else None, seed=seed, data_seed=data_seed, device=device, name=name,
            out=str(out), command=_command_line(ctx))
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TimeRemainingColumn(), console=console) as progress:
            result = run(cfg, progress)
    except AdaptuneError as e:
        return _fail(str(e))
    console.print(run_table(result))
    console.print(f"saved to {result['run_dir']}/ (results.json, {', '.join(sorted(result['files'].values()))})")


@app.command()
def report(runs: list[Path] = typer.Argument(..., help="run directories, e.g. runs/*"),
           plot: Path = typer.Option(Path("runs/report.png"), help="PNG of dev average vs % params updated per task"),
           markdown: Path = typer.Option(None, help="also write the table as markdown here")) -> None:
    """One table across multitask runs, and a plot of dev average vs % trainable parameters."""
    from adaptune import AdaptuneError
    from adaptune.experiments.report import find_runs, load_results, markdown_table, plot as plot_runs, runs_table
    from adaptune.files import atomic_write

    found, skipped = find_runs(runs)
    for line in skipped:
        console.print(f"[yellow]skipped[/yellow] {line}")
    if not found:
        return _fail("no finished runs (directories with a results.json) among the paths given; e.g. adaptune report runs/*")
    try:
        results = load_results(found)
    except AdaptuneError as e:
        return _fail(str(e))
    console.print(runs_table(results))
    console.print(f"plot: {plot_runs(results, plot)}")
    if markdown:
        table = markdown_table(results)
        atomic_write(markdown, lambda tmp: tmp.write_text(table))
        console.print(f"markdown: {markdown}")


def _benchmarks():
    """The checkout's benchmarks/ (a development directory, never installed), from the current directory."""
    here = Path.cwd()
    if not (here / "benchmarks" / "run.py").is_file():
        _fail(f"adaptune bench runs from a checkout of adaptune: {here} has no benchmarks/run.py "
              f"(cd to the checkout, or run python -m benchmarks there)")
    if str(here) not in sys.path:
        sys.path.insert(0, str(here))
    from benchmarks import report, run
    return report, run


@app.command()
def bench(out: Path = typer.Option(..., "--out", help="results directory, e.g. benchmarks/results"),
          suite: str = typer.Option("all", "--suite", help="train, ops, sweep or all"),
          device: str = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)"),
          quick: bool = typer.Option(False, "--quick", help="fewer runs, ranks and sizes: a rough look")) -> None:
    """Time training steps, ops and a rank sweep side by side with Hugging Face PEFT; check the targets
    (from a checkout of adaptune)."""
    bench_report, bench_run = _benchmarks()
    if suite not in (*bench_run.SUITES, "all"):
        return _fail(f"unknown suite {suite!r}; give one of train, ops, sweep or all")
    device = device or bench_run.default_device()
    if device not in ("cpu", "cuda"):
        return _fail(f"unknown device {device!r}; give cpu or cuda")

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
