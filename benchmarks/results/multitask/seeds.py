"""Statistics over seeds for the multitask results summaries (per-task/summarize.py, seed004/summarize.py)."""
from __future__ import annotations

import statistics


def stats(values: list[float]) -> dict:
    """n, mean, sample standard deviation (n - 1; None for one value) and the values."""
    return {"n": len(values), "mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None, "values": values}


def paired(a: dict | None, b: dict | None) -> dict | None:
    """b's dev average minus a's, per seed both ran (groups with "seeds" and "dev_average" values): the seeds and
    the differences' statistics (None: no seed in common)."""
    if not a or not b:
        return None
    both = sorted(set(a["seeds"]) & set(b["seeds"]))
    diffs = [b["dev_average"]["values"][b["seeds"].index(s)] - a["dev_average"]["values"][a["seeds"].index(s)]
             for s in both]
    return {"seeds": both, **stats(diffs)} if diffs else None


def cell(s: dict) -> str:
    """'mean ± std' (the mean alone for one seed), three decimals."""
    return f"{s['mean']:.3f}" + (f" ± {s['std']:.3f}" if s["std"] is not None else "")


DATASETS = ("sst", "para", "sts")


def group_stats(group: list[dict]) -> dict:
    """The seeds of a configuration's runs (results.json dicts) and the statistics of their dev average and each
    dataset's dev score; the share of the base updated per task."""
    group = sorted(group, key=lambda run: run["config"]["seed"])
    return {"seeds": [run["config"]["seed"] for run in group],
            "dev_average": stats([run["dev_average"] for run in group]),
            **{t: stats([run["tasks"][t]["dev"] for run in group]) for t in DATASETS},
            "pct_updated_mean": group[0]["pct_updated_mean"]}


def table(groups: dict[str, dict], head: str, suffix: str = "") -> str:
    """summary.md: one row per group of group_stats (`head`: the first column's title; `suffix` after each name)."""
    lines = [f"| {head} | seeds | dev average | sst | para | sts | % updated/task |", "|---|---|---|---|---|---|---|"]
    for key, g in groups.items():
        lines.append(f"| {key}{suffix} | {g['dev_average']['n']} | {cell(g['dev_average'])} | {cell(g['sst'])} | "
                     f"{cell(g['para'])} | {cell(g['sts'])} | {g['pct_updated_mean']:.3g}% |")
    return "\n".join(lines) + "\n"
