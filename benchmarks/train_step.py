"""One AdamW training step: on CPU a BERT-base-shaped and a GPT-2-small-shaped model, on CUDA a Llama-shaped
model of 1.1B parameters (random weights; TinyLlama-1.1B's shape).

Compared: full fine-tuning, PEFT LoRA, PEFT DoRA, adaptune LoRA and DoRA on the reference path and on the
kernel path (listed as skipped where the kernels are not built). q/k/v targets, r = 12; batch 16 × 64 tokens
on CPU, 8 × 512 on CUDA; tokens/s = batch·seq / median step time.
"""
from __future__ import annotations

from .models import train_step
from .worker import Built, Case

NAME = "train_step"
MODELS = {"cpu": ("bert-base", "gpt2-small"), "cuda": ("llama-1b",), "tiny": ("bert-tiny", "gpt2-tiny", "llama-tiny")}
R, BATCH, SEQ = 12, 16, 64
SHAPES = {"cpu": (BATCH, SEQ), "cuda": (8, 512), "tiny": (2, 16)}  # (batch, tokens) of a step
TINY_BATCH, TINY_SEQ = SHAPES["tiny"]


def adaptune_paths(kernels: bool, both: bool = True) -> list[tuple[str, str]]:
    """(path label, ADAPTUNE_KERNELS value) of every adaptune path measured: the reference and the kernels, or
    (`both` False) the kernels alone, with the reference standing in where they are not built. A kernel path
    is listed either way: where it cannot run, run.py records it as skipped with the reason."""
    return [("kernels", "require")] if kernels and not both else [("reference", "off"), ("kernels", "require")]


def cases(device: str, kernels: bool, tiny: bool = False, quick: bool = False) -> list[list[Case]]:
    """Groups of cases timed side by side: one group per model."""
    models, (batch, seq) = MODELS["tiny" if tiny else device], SHAPES["tiny" if tiny else device]
    groups = []
    for model in models:
        group = []
        for method in ("full", "peft-lora", "peft-dora", "adaptune-lora", "adaptune-dora"):
            paths = adaptune_paths(kernels) if method.startswith("adaptune") else [("-", "off")]
            for path, mode in paths:
                label = f"{model} {method}" + (f" [{path}]" if path != "-" else "")
                params = {"model": model, "method": method, "path": path, "r": R, "batch": batch, "seq": seq}
                group.append(Case(NAME, label, params, mode))
        groups.append(group)
    return groups


def build(params: dict, device: str) -> Built:
    step, info = train_step(params["model"], params["method"], params["r"], params["batch"],
                            params["seq"], device)
    return Built(step, info)


def add_rates(record: dict) -> dict:
    """it/s and tokens/s from the median step time."""
    if "median_s" in record:
        record["it_per_s"] = 1.0 / record["median_s"]
        record["tokens_per_s"] = record["tokens"] / record["median_s"]
    return record


def work_checks(records: list[dict]) -> list[dict]:
    """PEFT and adaptune must train the same number of parameters for each model and method."""
    by = {(r["model"], r["method"], r.get("path")): r for r in records}
    checks = []
    for (model, method, path), rec in by.items():
        if not method.startswith("adaptune-"):
            continue
        peft = by.get((model, "peft-" + method.split("-", 1)[1], "-"))
        if peft is None or "trainable" not in peft or "trainable" not in rec:
            continue
        checks.append({"model": model, "a": rec["name"], "b": peft["name"], "a_trainable": rec["trainable"],
                       "b_trainable": peft["trainable"], "equal": rec["trainable"] == peft["trainable"]})
    return checks
