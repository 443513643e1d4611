"""The transfer-recipe commands: `run fewshot` (zero-shot, prompt-based and head fine-tuning under LM-BFF's
few-shot protocol, with self-ensemble / self-distillation / TAPT components) and `tapt`.

Their options are generated from the fields of FewShotMethod, FewShotConfig and TaptConfig."""
from __future__ import annotations

import typer
from rich.table import Table

from adaptune.experiments.fewshot.config import FewShotConfig, FewShotMethod, TaptConfig

from .common import command_line, console, fail, progress, set_threads
from .options import fields_of, options

FEWSHOT_OPTIONS = options(FewShotMethod, panel="Method") + options(FewShotConfig)
TAPT_OPTIONS = options(FewShotMethod, panel="Method") + options(TaptConfig)


def run_fewshot(ctx: typer.Context, *,
                threads: int = typer.Option(1, help="torch CPU threads", rich_help_panel="Run"), **values) -> None:
    """Few-shot classification (LM-BFF's protocol: K per class, a dev set as large, several seeds): zero-shot
    prompts, prompt-based or head fine-tuning with any method; test accuracy as mean ± std over the seeds."""
    from adaptune import AdaptuneError
    from adaptune.experiments.fewshot.run import run

    set_threads(threads)
    try:
        cfg = FewShotConfig(method=FewShotMethod(**fields_of(FewShotMethod, FEWSHOT_OPTIONS, values)),
                            command=command_line(ctx), **fields_of(FewShotConfig, FEWSHOT_OPTIONS, values))
        with progress() as bars:
            result = run(cfg, bars)
    except AdaptuneError as e:
        return fail(str(e))
    table = Table("seed", "train", "best dev", "test acc", "self-ensemble test",
                  title=f"{result['name']}: {result['config']['dataset']} ({result['data']['test']} test examples)")
    for r in result["seeds"]:
        ens = f"{r['ensemble_test']:.4f}" if "ensemble_test" in r else "-"
        dev = f"{r['best_dev']:.4f}" if "best_dev" in r else "-"
        table.add_row("-" if r["seed"] is None else str(r["seed"]), str(r.get("train", 0)), dev,
                      f"{r['test']:.4f}", ens)
    for key, what in (("test", "test acc"), ("ensemble_test", "self-ensemble test")):
        if key in result["summary"]:
            s = result["summary"][key]
            table.caption = (table.caption + "; " if table.caption else "") + f"{what} {s['mean']:.4f} ± {s['std']:.4f}"
    console.print(table)
    console.print(f"saved to {result['run_dir']}/")


def run_tapt(ctx: typer.Context, *,
             threads: int = typer.Option(1, help="torch CPU threads", rich_help_panel="Run"), **values) -> None:
    """Task-adaptive pretraining: the components continue LM training on the dataset's unlabelled text; the
    output directory is what `adaptune run fewshot --init-from DIR` starts from."""
    from adaptune import AdaptuneError
    from adaptune.experiments.fewshot.tapt import tapt

    set_threads(threads)
    try:
        cfg = TaptConfig(method=FewShotMethod(**fields_of(FewShotMethod, TAPT_OPTIONS, values)),
                         command=command_line(ctx), **fields_of(TaptConfig, TAPT_OPTIONS, values))
        with progress() as bars:
            info = tapt(cfg, bars)
    except AdaptuneError as e:
        return fail(str(e))
    losses = info["losses"]
    n = max(1, len(losses) // 10)  # the first and the last tenth of the steps
    head, tail = sum(losses[:n]) / n, sum(losses[-n:]) / n
    console.print(f"TAPT of {info['method']} on {info['model']} over {info['texts']} texts of {info['dataset']}: "
                  f"loss {head:.3f} (first {n} steps) -> {tail:.3f} (last {n}); saved to {cfg.out}/")
