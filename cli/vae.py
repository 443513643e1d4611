"""The AdaVAE commands: `run vae`, `vae sample|reconstruct|interpolate|analogy`, `pretrain-lm`.

Their options are generated from the fields of VAEConfig, TrainConfig, RunConfig and PretrainConfig."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from adaptune.experiments.vae.config import PretrainConfig, RunConfig, TrainConfig, VAEConfig

from .common import command_line, console, fail, progress, set_threads
from .options import fields_of, options

VAE_OPTIONS = options(VAEConfig) + options(TrainConfig) + options(RunConfig)


def run_vae(ctx: typer.Context, *,
            threads: int = typer.Option(1, help="torch CPU threads", rich_help_panel="Run"), **values) -> None:
    """AdaVAE (seed 001): a VAE language model on one frozen causal LM; test PPL, -ELBO, MI, AU."""
    from adaptune import AdaptuneError
    from adaptune.experiments.vae.run import run

    set_threads(threads)
    try:
        cfg = RunConfig(vae=VAEConfig(**fields_of(VAEConfig, VAE_OPTIONS, values)),
                        training=TrainConfig(**fields_of(TrainConfig, VAE_OPTIONS, values)),
                        command=command_line(ctx), **fields_of(RunConfig, VAE_OPTIONS, values))
        with progress() as bars:
            result = run(cfg, bars)
    except AdaptuneError as e:
        return fail(str(e))
    m = result["test"]
    table = Table("PPL", "PPL (Optimus tokens)", "-ELBO", "MI", "AU", "base PPL", "% trainable",
                  title=f"{result['name']} on {result['config']['corpus']} test ({m['sentences']} sentences)")
    table.add_row(f"{m['ppl']:.2f}", f"{m['ppl_optimus_tokens']:.2f}", f"{m['neg_elbo']:.2f}", f"{m['mi']:.3f}",
                  str(m["au"]), f"{m['base_ppl']:.2f}", f"{result['params']['pct_trainable']:.2f}")
    console.print(table)
    for line in result["samples"]:
        console.print(f"  sample: {line}", highlight=False, markup=False)
    console.print(f"saved to {result['run_dir']}/")


vae_app = typer.Typer(help="Sentences from a trained `adaptune run vae` run.", no_args_is_help=True)
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
        return fail(str(e))
    for label, text in lines:
        console.print(f"[bold]{label}[/bold]  {text}", highlight=False)


@vae_app.command()
def sample(run: Path = RUN, n: int = typer.Option(5, help="sentences"), greedy: bool = GREEDY, top_k: int = TOP_K,
           top_p: float = TOP_P, seed: int = SEED) -> None:
    """Decode sentences from latents z ~ N(0, I)."""
    import torch

    from adaptune.experiments.vae.generation import decode

    if n < 1:
        return fail(f"--n must be at least 1 (the number of sentences to sample), got {n}")

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


PRETRAIN_OPTIONS = options(PretrainConfig)


def pretrain_lm(out: Path = typer.Option(None, "--out", help="where the model goes (default: the cache the base "
                                                             "'small-gpt2' is read from)", rich_help_panel="Run"),
                overwrite: bool = typer.Option(False, "--overwrite", help="replace a model already there",
                                               rich_help_panel="Run"),
                threads: int = typer.Option(2, help="torch CPU threads", rich_help_panel="Run"), **values) -> None:
    """Train the small GPT-2 `small-gpt2` from scratch on the corpora's train splits; print its held-out PPL."""
    from adaptune import AdaptuneError
    from adaptune.experiments.vae.pretrain import default_out, pretrain, read_pretrained

    set_threads(threads)
    target = out if out is not None else default_out()
    try:
        cfg = PretrainConfig(**fields_of(PretrainConfig, PRETRAIN_OPTIONS, values))
        found = read_pretrained(target)
        if target.exists() and found is None:  # never replace what pretrain-lm did not write
            return fail(f"{target} exists and is not a model of `adaptune pretrain-lm`; give another --out")
        if found is not None and not overwrite:
            console.print(f"{target} is already built (give --overwrite to train it again)")
            result = {**found, "out": str(target)}
        else:
            with progress() as bars:
                bar = bars.add_task("pretrain", total=cfg.steps)
                result = pretrain(cfg, target, log=console.print, on_step=lambda step, loss: bars.update(
                    bar, advance=1, description=f"pretrain  loss {loss:.3f}"))
    except AdaptuneError as e:
        return fail(str(e))
    table = Table("corpus", "held-out split", "sentences", "PPL", title=f"{result['params']:,}-parameter GPT-2, "
                  f"vocab {result['vocab']:,}, {result['config']['steps']} steps")
    for name, h in result["held_out"].items():
        table.add_row(name, h["split"], str(h["sentences"]), f"{h['ppl']:.2f}")
    console.print(table)
    use = "small-gpt2" if Path(result["out"]) == default_out() else result["out"]
    console.print(f"saved to {result['out']}/ (use it: adaptune run vae --base {use})")


@vae_app.command()
def classify(run: Path = RUN,
             dataset: str = typer.Option("yelp", help="yelp (the corpus's labels) or sst (SST-5 as 0-1 vs 3-4)"),
             labels: str = typer.Option("10,100,1000,10000", help="label budgets, comma-separated"),
             seeds: int = typer.Option(5, help="seeds per budget (the sample and the training)"),
             methods: str = typer.Option("feature,pe,finetune,minilm", help="feature, pe, finetune, minilm"),
             test_limit: int = typer.Option(2000, help="test sentences, a seeded subset"),
             data_dir: Path = typer.Option(None, help="the data folder (yelp: the LM corpora; sst: cs224n)"),
             out: Path = typer.Option(None, help="results JSON (default: <run>/classify-<dataset>.json; the "
                                                 "plot goes beside it as .png)"),
             threads: int = typer.Option(1, help="torch CPU threads")) -> None:
    """Latent classification (seed Table 3 / Figure 1): sentiment from few labels on the run's posterior."""
    import json

    from adaptune import AdaptuneError
    from adaptune.experiments.vae.classify import LABELS, classify as run_classify, load_labelled, plot
    from adaptune.experiments.vae.run import load_run
    from adaptune.files import atomic_write

    set_threads(threads)
    try:
        sizes = [int(x) for x in labels.split(",") if x.strip()]
    except ValueError:
        return fail(f"--labels {labels!r}: give comma-separated integers, e.g. 10,100,1000")
    target = out if out is not None else run / f"classify-{dataset}.json"
    try:
        vae, tokenizer, results = load_run(run)
        data = load_labelled(dataset, data_dir, test_limit)
        with console.status("classifying") as status:
            result = run_classify(vae, tokenizer, data, methods=[m.strip() for m in methods.split(",") if m.strip()],
                                  sizes=sizes, seeds=seeds, max_length=results["config"]["max_length"],
                                  on_trial=lambda line: status.update(f"classifying: {line}"))
        result["run"] = str(run)
        atomic_write(target, lambda tmp: tmp.write_text(json.dumps(result, indent=1) + "\n"))
        png = plot(result, target.with_suffix(".png"), f"latent classification on {dataset} ({results['name']})")
    except AdaptuneError as e:
        return fail(str(e))
    table = Table("method", *[f"{n} labels" for n in result["sizes"]],
                  title=f"{dataset} test accuracy ({result['test_sentences']} sentences), mean ± std of {seeds} seeds")
    for method, by_n in result["results"].items():
        table.add_row(LABELS[method], *[f"{by_n[str(n)]['mean']:.3f} ± {by_n[str(n)]['std']:.3f}"
                                        for n in result["sizes"]])
    console.print(table)
    console.print(f"saved {target} and {png}")
