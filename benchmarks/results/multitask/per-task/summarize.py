"""Mean and standard deviation over seeds of the per-task LoRA / DoRA runs in per-run/ (run.sh writes them).

Usage (from the repository root): python benchmarks/results/multitask/per-task/summarize.py
Writes summary.json and summary.md here: per method and rank, the number of seeds, and the mean and sample
standard deviation (n - 1) of the dev average and of each dataset's dev score; DoRA - LoRA per seed where both
ran (the paired difference, which cancels what a seed does to both); and per method the step from one rank to the
next (r = 12 minus r = 4, r = 24 minus r = 12), paired by seed the same way.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from seeds import group_stats, paired, table  # noqa: E402



def main() -> Path:
    runs = [json.loads(p.read_text()) for p in sorted((HERE / "per-run").glob("*.json"))]
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(f"{run['config']['method']['name']}-r{run['config']['method']['r']}", []).append(run)
    out: dict = {"how": __doc__.split("\n\n")[0], "groups": {}, "dora_minus_lora": {}, "rank_steps": {}}
    out["groups"] = {key: group_stats(group) for key, group in sorted(groups.items())}
    for r in sorted({run["config"]["method"]["r"] for run in runs}):
        diffs = paired(out["groups"].get(f"lora-r{r}"), out["groups"].get(f"dora-r{r}"))
        if diffs:
            out["dora_minus_lora"][f"r{r}"] = diffs
    ranks = sorted({run["config"]["method"]["r"] for run in runs})
    for method in ("lora", "dora"):
        for low, high in zip(ranks, ranks[1:]):
            diffs = paired(out["groups"].get(f"{method}-r{low}"), out["groups"].get(f"{method}-r{high}"))
            if diffs:
                out["rank_steps"][f"{method}-r{high}-minus-r{low}"] = diffs
    (HERE / "summary.json").write_text(json.dumps(out, indent=1) + "\n")
    (HERE / "summary.md").write_text(table(out["groups"], "method", " per task"))
    return HERE / "summary.json"


if __name__ == "__main__":
    print(main())
