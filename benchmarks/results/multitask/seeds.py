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
