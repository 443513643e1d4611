"""The adaptune CLI (inspect, info, run multitask, report, bench): parse, call adaptune, render with rich.

`run multitask`'s options are generated from the fields of Method and ExperimentConfig (cli/options.py)."""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from adaptune.experiments.config import ExperimentConfig
from adaptune.experiments.methods import Method
from adaptune.experiments.vae.model import VAEConfig
from adaptune.experiments.vae.run import RunConfig
from adaptune.experiments.vae.training import TrainConfig

from .options import fields_of, options, with_options

app = typer.Typer(help="adaptune: composable parameter-efficient fine-tuning.", no_args_is_help=True,
                  add_completion=False)
console = Console()


def _fail(message: str) -> None:
    """One line, 'error: MESSAGE', and exit status 2: the message is printed as is (no rich markup, no wrapping)."""
    from rich.markup import escape
    console.print(f"[red]error:[/red] {escape(' '.join(str(message).split()))}", soft_wrap=True, highlight=False)
    raise typer.Exit(2)


@app.command()
def inspect(model: str = typer.Argument(..., help="minilm, gpt2-tiny, bert-tiny, gpt2-small, bert-base or a local model dir"),
            spec: str = typer.Option(None, "--spec", help="components to attach, e.g. 'attn=LoRA(12)|Prefix(10); ffn=Adapter(64)'")) -> None:
    """Print a model's sites with their modules and parameter counts (and what SPEC would add)."""
    from adaptune import AdaptuneError, attach
    from adaptune.experiments.config import load_base
    from adaptune.sites import SiteMap
    from adaptune.spec import parse_spec

    try:
        base = load_base(model, seed=0)  # a preset, a model directory (with its config.json), a cached hub name
        plan = parse_spec(spec) if spec else None
    except AdaptuneError as e:
        return _fail(str(e))
    sites = SiteMap(base)
    layers = (" + ".join(f"{len(s.layers)} {s.name}" for s in sites.stacks) if len(sites.stacks) > 1
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

    if Path(sys.argv[0]).name == "adaptune":
        return shlex.join(["adaptune", *sys.argv[1:]])
    parts = ["adaptune", "run", ctx.info_name or "multitask"]
    for p in ctx.command.params:
        v = ctx.params.get(p.name)
        if v is None or v == p.default or (v is False and not p.secondary_opts):
            continue
        if isinstance(v, bool):
            parts.append(max(p.opts, key=len) if v else max(p.secondary_opts, key=len))
        else:
            parts += [max(p.opts, key=len), str(v)]
    return shlex.join(parts)


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
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from adaptune import AdaptuneError
    from adaptune.experiments.multitask import run
    from adaptune.experiments.report import run_table

    if threads < 1:
        return _fail(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)
    if values["stack"]:
        if ctx.get_parameter_source("method").name == "DEFAULT":  # typer's own click: compare by name
            values["method"] = "stack"  # --stack alone selects method 'stack'
        elif values["method"] != "stack":
            return _fail(f"--stack gives the composition of method 'stack'; "
                         f"drop --method {values['method']} or --stack")
    try:
        cfg = multitask_config(values, command=_command_line(ctx))
        if os.environ.get("RANK", "0") != "0":  # under torchrun: rank 0 shows progress, prints and saves
            run(cfg)
            return None
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TimeRemainingColumn(), console=console) as progress:
            result = run(cfg, progress)
    except AdaptuneError as e:
        return _fail(str(e))
    console.print(run_table(result))
    console.print(f"saved to {result['run_dir']}/ (results.json, {', '.join(sorted(result['files'].values()))})")


run_app.command("multitask")(with_options(run_multitask, MULTITASK_OPTIONS))

VAE_OPTIONS = options(VAEConfig) + options(TrainConfig) + options(RunConfig)


def run_vae(ctx: typer.Context, *,
            threads: int = typer.Option(1, help="torch CPU threads", rich_help_panel="Run"), **values) -> None:
    """AdaVAE (seed 001): a VAE language model on one frozen causal LM; test PPL, -ELBO, MI, AU."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from adaptune import AdaptuneError
    from adaptune.experiments.vae.run import run

    if threads < 1:
        return _fail(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)
    try:
        cfg = RunConfig(vae=VAEConfig(**fields_of(VAEConfig, VAE_OPTIONS, values)),
                        training=TrainConfig(**fields_of(TrainConfig, VAE_OPTIONS, values)),
                        command=_command_line(ctx), **fields_of(RunConfig, VAE_OPTIONS, values))
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TimeRemainingColumn(), console=console) as progress:
            result = run(cfg, progress)
    except AdaptuneError as e:
        return _fail(str(e))
    m = result["test"]
    table = Table("PPL", "PPL (Optimus tokens)", "-ELBO", "MI", "AU", "base PPL", "% trainable",
                  title=f"{result['name']} on {result['config']['corpus']} test ({m['sentences']} sentences)")
    table.add_row(f"{m['ppl']:.2f}", f"{m['ppl_optimus_tokens']:.2f}", f"{m['neg_elbo']:.2f}", f"{m['mi']:.3f}",
                  str(m["au"]), f"{m['base_ppl']:.2f}", f"{result['params']['pct_trainable']:.2f}")
    console.print(table)
    for line in result["samples"]:
        console.print(f"  sample: {line}", highlight=False, markup=False)
    console.print(f"saved to {result['run_dir']}/")


run_app.command("vae")(with_options(run_vae, VAE_OPTIONS))

vae_app = typer.Typer(help="Sentences from a trained `adaptune run vae` run.", no_args_is_help=True)
app.add_typer(vae_app, name="vae")
RUN = typer.Option(..., "--run", help="a run directory of `adaptune run vae`, e.g. runs/<name>")
GREEDY = typer.Option(False, "--greedy", help="greedy decoding instead of sampling")
TOP_K = typer.Option(0, help="sample from the k most likely tokens (0: all)")
TOP_P = typer.Option(0.9, help="nucleus sampling: the smallest set of tokens with this much probability")
SEED = typer.Option(0, help="seed of the latents drawn and of sampling")


def _vae_lines(run: Path, make) -> None:
    """Load the run, print the (label, sentence) lines `make(vae, tokenizer, max_length)` returns."""
    from adaptune import AdaptuneError
    from adaptune.experiments.vae.run import load_run

    try:
        vae, tokenizer, results = load_run(run)
        lines = make(vae, tokenizer, results["config"]["max_length"])
    except AdaptuneError as e:
        return _fail(str(e))
    for label, text in lines:
        console.print(f"[bold]{label}[/bold]  {text}", highlight=False)


@vae_app.command()
def sample(run: Path = RUN, n: int = typer.Option(5, help="sentences"), greedy: bool = GREEDY, top_k: int = TOP_K,
           top_p: float = TOP_P, seed: int = SEED) -> None:
    """Decode sentences from latents z ~ N(0, I)."""
    import torch

    from adaptune.experiments.vae.generation import decode

    def make(vae, tok, length):
        z = torch.randn(n, vae.cfg.latent_dim, generator=torch.Generator().manual_seed(seed))
        return [(f"{i}", s) for i, s in enumerate(decode(vae, tok, z, max_length=length, greedy=greedy, top_k=top_k,
                                                         top_p=top_p, seed=seed))]
    _vae_lines(run, make)


@vae_app.command()
def reconstruct(sentences: list[str] = typer.Argument(..., help="sentences to encode and decode"), run: Path = RUN,
                greedy: bool = typer.Option(True, "--greedy/--sample", help="greedy decoding, or sampling"),
                top_k: int = TOP_K, top_p: float = TOP_P, seed: int = SEED) -> None:
    """Encode each sentence to its posterior mean and decode it again."""
    from adaptune.experiments.vae.generation import decode, latents

    def make(vae, tok, length):
        out = decode(vae, tok, latents(vae, tok, sentences, length), max_length=length, greedy=greedy, top_k=top_k,
                     top_p=top_p, seed=seed)
        return [line for x, y in zip(sentences, out) for line in (("in ", x), ("out", y))]
    _vae_lines(run, make)


@vae_app.command()
def interpolate(a: str = typer.Argument(..., help="sentence A"), b: str = typer.Argument(..., help="sentence B"),
                run: Path = RUN, steps: int = typer.Option(11, help="points from A to B (11: τ = 0, 0.1, ..., 1)"),
                greedy: bool = typer.Option(True, "--greedy/--sample"), seed: int = SEED) -> None:
    """Decode z_τ = (1 − τ)·z_A + τ·z_B from A to B."""
    from adaptune.experiments.vae.generation import decode, interpolate as between, latents

    def make(vae, tok, length):
        z = latents(vae, tok, [a, b], length)
        out = decode(vae, tok, between(z[0], z[1], steps), max_length=length, greedy=greedy, seed=seed)
        return [(f"τ={i / (steps - 1):.2f}", s) for i, s in enumerate(out)]
    _vae_lines(run, make)


@vae_app.command()
def analogy(a: str = typer.Argument(..., help="A"), b: str = typer.Argument(..., help="B"),
            c: str = typer.Argument(..., help="C"), run: Path = RUN,
            greedy: bool = typer.Option(True, "--greedy/--sample"), seed: int = SEED) -> None:
    """A is to B as C is to D: decode z_D = z_B − z_A + z_C."""
    from adaptune.experiments.vae.generation import analogy as relate, decode, latents

    def make(vae, tok, length):
        z = latents(vae, tok, [a, b, c], length)
        (d,) = decode(vae, tok, relate(z[0], z[1], z[2]).unsqueeze(0), max_length=length, greedy=greedy, seed=seed)
        return [("A", a), ("B", b), ("C", c), ("D", d)]
    _vae_lines(run, make)


@app.command()
def report(runs: list[Path] = typer.Argument(..., help="run directories, e.g. runs/*"),
           plot: Path = typer.Option(Path("runs/report.png"), help="PNG of dev average vs % params updated per task"),
           markdown: Path = typer.Option(None, help="also write the table as markdown here")) -> None:
    """One table across multitask runs, and a plot of dev average vs % trainable parameters."""
    from adaptune import AdaptuneError
    from adaptune.experiments.report import find_runs, load_results, markdown_table, plot as plot_runs, runs_table
    from adaptune.files import atomic_write
    from rich.markup import escape

    for option, path in (("--plot", plot), ("--markdown", markdown)):
        if path is not None and path.is_dir():
            return _fail(f"{option} {str(path)!r} is a directory; give a file path, e.g. {path / 'report'}"
                         f"{'.png' if option == '--plot' else '.md'}")
    found, skipped = find_runs(runs)
    for line in skipped:
        console.print(f"[yellow]skipped[/yellow] {escape(line)}")
    if not found:
        return _fail("no finished runs (directories with a results.json) among the paths given; e.g. adaptune report runs/*")
    try:
        results = load_results(found)
        table = runs_table(results)
        written = plot_runs(results, plot)
        if markdown:
            text = markdown_table(results)
            atomic_write(markdown, lambda tmp: tmp.write_text(text))
    except AdaptuneError as e:
        return _fail(str(e))
    console.print(table)
    console.print(f"plot: {written}")
    if markdown:
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
