"""Mean and standard deviation over seeds of seed 004's runs in per-run/ (run.sh writes them).

Usage (from the repository root): python benchmarks/results/multitask/seed004/summarize.py
Writes summary.json and summary.md here: per configuration (the run name without its -seedN), the number of seeds,
the mean and sample standard deviation (n - 1) of the dev average and each dataset's dev score, the share of the
base updated per task; and the two claims' differences paired by seed: Adapter 18 minus LoRA r = 12 (an equal
budget), LoRA+Adapter minus full fine-tuning.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from seeds import group_stats, paired, table  # noqa: E402

CLAIMS = {"adapter_minus_lora": ("lora-r12", "adapter-dim18"), "lora_adapter_minus_full": ("full", "lora+adapter-r8-dim32")}


def main() -> Path:
    groups: dict[str, list[dict]] = {}
    for path in sorted((HERE / "per-run").glob("*.json")):
        run = json.loads(path.read_text())
        groups.setdefault(re.sub(r"-seed\d+$", "", run["name"]), []).append(run)
    out: dict = {"how": __doc__.split("\n\n")[0], "groups": {}, "claims": {}}
    out["groups"] = {key: group_stats(group) for key, group in sorted(groups.items())}
    for claim, (a, b) in CLAIMS.items():
        diff = paired(out["groups"].get(a), out["groups"].get(b))
        if diff:
            out["claims"][claim] = {"of": f"{b} minus {a}", **diff}
    (HERE / "summary.json").write_text(json.dumps(out, indent=1) + "\n")
    (HERE / "summary.md").write_text(table(out["groups"], "configuration", ""))
    return HERE / "summary.json"


if __name__ == "__main__":
    print(main())
