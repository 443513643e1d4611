"""`adaptune report` across the wings: the run directories among the paths given, each results.json read and
checked by the wing whose format it names, and each wing's tables and plots.

The one module that imports every wing (their report modules); no wing imports it, so the wings stay
independent of each other (.importlinter)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from ..errors import LoadError
from .fewshot import report as fewshot
from .multitask import report as multitask
from .multitask.runs import read_results
from .vae import report as vae
from .vae.results import check_vae


def find_runs(paths: list[str | Path]) -> tuple[list[Path], list[str]]:
    """(run directories, skipped): the paths holding a results.json (a results.json file stands for its
    directory); other files (report.png beside the runs) and unfinished runs are skipped and named."""
    found, skipped = [], []
    for p in map(Path, paths):
        if p.name == "results.json" and p.is_file():
            p = p.parent
        if (p / "results.json").is_file():
            found.append(p)
        else:
            why = ("no results.json (unfinished run?)" if p.is_dir() else
                   "not a run directory" if p.exists() else "no results.json (no such directory)")
            skipped.append(f"{p}: {why}")
    return found, skipped


def read(run_dir: Path) -> dict:
    """A multitask, VAE or few-shot run's results.json, checked by its wing (the format it names)."""
    path = run_dir / "results.json"
    try:
        found = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):
        found = None  # read_results names what is wrong
    if fewshot.is_fewshot(found):
        return fewshot.check_fewshot(found, path)
    return check_vae(found, path) if vae.is_vae(found) else read_results(run_dir)


def load_results(paths: list[str | Path]) -> list[dict]:
    """results.json of each run directory (or results.json file) given, multitask, VAE or few-shot runs; LoadError
    names a bad one."""
    out = [read(p.parent if p.name == "results.json" else p) for p in map(Path, paths)]
    if not out:
        raise LoadError("no runs given; e.g. adaptune report runs/*")
    return out


def report(results: list[dict], plot: str | Path, show: Callable[[Any], None]) -> tuple[list[Path], str]:
    """Each wing's runs in turn (multitask, VAE, few-shot): its table passed to `show`, its plots written
    (multitask: `plot`; VAE: <plot>-vae-curves.png and, for a λ sweep, <plot>-vae-lambda.png beside it).
    Returns (the plots written, the markdown of every table)."""
    plot = Path(plot)
    vae_runs = [r for r in results if vae.is_vae(r)]
    fewshot_runs = [r for r in results if fewshot.is_fewshot(r)]
    multitask_runs = [r for r in results if not (vae.is_vae(r) or fewshot.is_fewshot(r))]
    written: list[Path] = []
    text = ""
    if multitask_runs:
        show(multitask.runs_table(multitask_runs))
        written.append(multitask.plot(multitask_runs, plot))
        text += multitask.markdown_table(multitask_runs)
    if vae_runs:
        show(vae.runs_table(vae_runs))
        stem = plot.with_suffix("")
        written.append(vae.plot_curves(vae_runs, f"{stem}-vae-curves.png"))
        swept = vae.plot_lambda(vae_runs, f"{stem}-vae-lambda.png")
        written += [swept] if swept else []
        text += ("\n" if text else "") + vae.markdown_table(vae_runs)
    if fewshot_runs:
        show(fewshot.runs_table(fewshot_runs))
        text += ("\n" if text else "") + fewshot.markdown_table(fewshot_runs)
    return written, text
