"""The per-round time ratios that benchmarks/results/README.md quotes, from the suites' results files.

Usage (from the repository root): python benchmarks/results/paired.py [DEVICE]   (default cpu)
Reads <suite>-DEVICE.json here and writes paired-DEVICE.json beside them. A ratio is benchmarks.targets.paired_ratio
(the verdicts' figure): the median over rounds of a's time / b's time in the same round, which cancels the machine's
drift between rounds. A pair whose records are missing is left out.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
from benchmarks.targets import paired_ratio  # noqa: E402

METHODS = ("lora", "dora", "adapter")
MODES = ("fwd", "train")
TASKS = (1, 3, 8, 32)


def pairs() -> dict[str, dict[str, tuple[str, str]]]:
    """suite -> {dotted key: (record a, record b)}: the ratios a / b the README quotes."""
    ops = {f"over_frozen.{k}": (name, "frozen 4096 linear") for k, name in (
        ("peft-lora", "lora 4096 peft"), ("adaptune-lora", "lora 4096 adaptune [kernels]"),
        ("peft-dora", "dora 4096 peft"), ("adaptune-dora", "dora 4096 adaptune [kernels]"))}
    ops["frozen_over_peft_dora"] = ("frozen 4096 linear", "dora 4096 peft")
    ops["dora_over_lora"] = ("dora 4096 adaptune [kernels]", "lora 4096 adaptune [kernels]")
    ops["dora_over_peft_dora"] = ("dora 4096 adaptune [kernels]", "dora 4096 peft")
    step = {f"{path}.{k}": (f"bert-base {a}" + (f" [{path}]" if "adaptune" in a else ""),
                            f"bert-base {b}" + (f" [{path}]" if "adaptune" in b else ""))
            for path in ("kernels", "reference")
            for k, a, b in (("lora_over_peft_lora", "adaptune-lora", "peft-lora"),
                            ("dora_over_lora", "adaptune-dora", "adaptune-lora"),
                            ("dora_over_peft_dora", "adaptune-dora", "peft-dora"))}
    routing = {}
    for m in METHODS:
        for mode in MODES:
            single = f"{m} {mode} single [kernels]"
            for t in TASKS:
                routing[f"{m}.mixed.{t}.{mode}"] = (f"{m} {mode} mixed T={t} [kernels]", single)
                routing[f"{m}.per-task.{t}.{mode}"] = (f"{m} {mode} per-task T={t} [kernels]", single)
    for t in TASKS:
        routing[f"lora.mixed_over_peft.{t}"] = (f"lora fwd mixed T={t} [kernels]", f"lora fwd peft adapter_names T={t}")
    q = "llama-8l"
    quantized = {"nf4_lora_over_peft": (f"{q} nf4 adaptune-lora", f"{q} nf4 peft-lora"),
                 "nf4_lora_over_peft_checkpointed": (f"{q} nf4 adaptune-lora +checkpointing",
                                                     f"{q} nf4 peft-lora +checkpointing"),
                 "nf4_dora_over_nf4_lora": (f"{q} nf4 adaptune-dora", f"{q} nf4 adaptune-lora"),
                 "nf4_dora_over_peft": (f"{q} nf4 adaptune-dora", f"{q} nf4 peft-dora")}
    e = "hidden 1024, 1024 tokens: "
    experts = {"lora_over_peft": (f"{e}adaptune lora [grouped]", f"{e}peft lora [-]"),
               "grouped_over_reference": (f"{e}adaptune lora [grouped]", f"{e}adaptune lora [reference]"),
               "lora_over_frozen": (f"{e}adaptune lora [grouped]", f"{e}transformers frozen [grouped_mm]"),
               "dora_over_lora": (f"{e}adaptune dora [grouped]", f"{e}adaptune lora [grouped]")}
    return {"ops": ops, "train_step": step, "routing": routing, "quantized": quantized, "experts": experts}


def main(device: str = "cpu") -> Path:
    out: dict = {"how": "median over rounds of a's time / b's time in the same round (benchmarks.targets.paired_ratio)"}
    for suite, wanted in pairs().items():
        path = HERE / f"{suite}-{device}.json"
        if not path.is_file():
            continue
        result = json.loads(path.read_text())
        records = {r["name"]: r for r in result["records"]}
        ratios: dict = {"from": f"{path.name} ({result['environment'].get('date')})", "of": {}}
        for key, (a, b) in wanted.items():
            if a in records and b in records and (value := paired_ratio(records[a], records[b])) is not None:
                *parents, leaf = key.split(".")
                node = ratios
                for part in parents:
                    node = node.setdefault(part, {})
                node[leaf] = value
                ratios["of"][key] = f"{a} / {b}"
        out[suite] = ratios
    target = HERE / f"paired-{device}.json"
    target.write_text(json.dumps(out, indent=1) + "\n")
    return target


if __name__ == "__main__":
    print(main(*sys.argv[1:2]))
