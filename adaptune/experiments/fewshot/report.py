"""Tables of `adaptune run fewshot` runs: one row per run (a dataset, base, mode, method and recipes), the test
accuracy as mean ± population std over the seeds, and the self-ensemble's beside it."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from rich.table import Table

from ...errors import LoadError
from ..common.tables import markdown, table
from ..common.runs import NUMBER, malformed
from .run import FORMAT

HEAD = ["run", "dataset", "base", "mode", "method", "recipes", "seeds", "test acc", "self-ensemble acc",
        "best dev", "trainable", "steps", "train s/seed", "test n"]
REQUIRED = {"name": str, "config": dict, "config.dataset": str, "config.model": str, "config.mode": str,
            "config.method": str, "seeds": list, "summary": dict, "summary.test.mean": NUMBER,
            "summary.test.std": NUMBER, "data.test": int}
OPTIONAL = {"summary.ensemble_test.mean": NUMBER, "summary.ensemble_test.std": NUMBER, "config.self_ensemble": int,
            "config.self_distill": NUMBER, "config.quantize": str}
SEED, SEED_OPTIONAL = {"test": NUMBER}, {"best_dev": NUMBER, "train_s": NUMBER, "trainable": int}
TERMINAL = ("dataset", "base", "mode", "method", "recipes", "seeds", "test acc", "self-ensemble acc", "best dev",
            "train s/seed")


def is_fewshot(result: Any) -> bool:
    return isinstance(result, dict) and result.get("format") == FORMAT


def check_fewshot(result: Any, path: Path) -> dict:
    """`result` if it is a few-shot run's results.json, else LoadError naming what is missing or malformed."""
    wrong = malformed(result, REQUIRED, OPTIONAL)
    if "seeds" not in wrong:
        wrong += [f"seeds[{i}].{k}" for i, r in enumerate(result["seeds"]) for k in malformed(r, SEED, SEED_OPTIONAL)]
        wrong += [] if result["seeds"] else ["seeds (empty)"]
    if wrong:
        raise LoadError(f"{path}: missing or malformed {', '.join(wrong[:6])}; expected a results.json written by "
                        f"adaptune run fewshot (format {FORMAT!r})")
    return result


def recipes(config: dict) -> str:
    parts = [f"self-ensemble {config['self_ensemble']}"] if config.get("self_ensemble") else []
    parts += [f"self-distill λ={config['self_distill']:g}"] if config.get("self_distill") is not None else []
    parts += ["TAPT"] if config.get("init_from") else []
    return ", ".join(parts) or "-"


def base(config: dict) -> str:
    """The base's name, and its quantization (--quantize) if any: 'tiny-llama (nf4)'."""
    name = Path(str(config["model"])).name
    return f"{name} ({config['quantize']})" if config.get("quantize") else name


def _pm(summary: dict | None) -> str:
    return "-" if not summary else f"{summary['mean']:.3f} ± {summary['std']:.3f}"


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def rows(results: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows (by dataset, base, mode, method, recipes), for rich and markdown alike."""
    out = []
    for r in sorted(results, key=lambda r: (r["config"]["dataset"], base(r["config"]), r["config"]["mode"],
                                            r["config"]["method"], recipes(r["config"]))):
        c, seeds = r["config"], r["seeds"]
        zero = c["mode"] == "zero-shot"
        dev, train_s = _mean([s["best_dev"] for s in seeds if "best_dev" in s]), _mean(
            [s["train_s"] for s in seeds if "train_s" in s])
        out.append([r["name"], c["dataset"], base(c), c["mode"], "-" if zero else c["method"],
                    recipes(c), "-" if zero else str(len(seeds)),
                    f"{seeds[0]['test']:.3f}" if zero else _pm(r["summary"]["test"]),
                    _pm(r["summary"].get("ensemble_test")), "-" if dev is None else f"{dev:.3f}",
                    "-" if zero else f"{seeds[0].get('trainable', 0):,}", "-" if zero else str(c.get("steps")),
                    "-" if train_s is None else f"{train_s:.0f}", str(r["data"]["test"])])
    return HEAD, out


def runs_table(results: list[dict]) -> Table:
    return table(*rows(results), title="few-shot runs (test accuracy, mean ± std over seeds; the markdown has every "
                                       "column)", columns=TERMINAL)


def markdown_table(results: list[dict]) -> str:
    return markdown(*rows(results))
