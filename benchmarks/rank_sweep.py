"""A rank sweep like seed 002's Table 2: adaptune DoRA at r = 1, 4, 12, 24, 128, LoRA at r = 12, full
fine-tuning, and the last layer only (the paper's "MultitaskBERT (last layer)": the base frozen, a new head
trained) on the same BERT-base-shaped model (batch 16 × 64, one AdamW step): step time, it/s, tokens/s and
peak memory (peak RSS on CPU, max_memory_allocated on CUDA). adaptune runs its kernels; where they are not
built the reference stands in and the kernel rows are listed as skipped.
"""
from __future__ import annotations

from .models import train_step
from .train_step import BATCH, SEQ, TINY_BATCH, TINY_SEQ, adaptune_paths
from .worker import Built, Case

NAME = "rank_sweep"
RANKS = (1, 4, 12, 24, 128)
QUICK_RANKS = (1, 12, 128)
TINY_RANKS = (1, 4)


def cases(device: str, kernels: bool, tiny: bool = False, quick: bool = False) -> list[list[Case]]:
    model = "bert-tiny" if tiny else "bert-base"
    batch, seq = (TINY_BATCH, TINY_SEQ) if tiny else (BATCH, SEQ)
    ranks = TINY_RANKS if tiny else QUICK_RANKS if quick else RANKS
    base = {"model": model, "batch": batch, "seq": seq}
    group = [Case(NAME, f"{model} {method}", {**base, "method": method, "r": None, "path": "-"})
             for method in ("full", "head-only")]
    lora_r = TINY_RANKS[-1] if tiny else 12
    for path, mode in adaptune_paths(kernels, both=False):
        group.append(Case(NAME, f"{model} adaptune-lora r={lora_r} [{path}]",
                          {**base, "method": "adaptune-lora", "r": lora_r, "path": path}, mode))
        group += [Case(NAME, f"{model} adaptune-dora r={r} [{path}]",
                       {**base, "method": "adaptune-dora", "r": r, "path": path}, mode) for r in ranks]
    return [group]


def add_rates(record: dict) -> dict:
    from .train_step import add_rates as rates
    return rates(record)


def build(params: dict, device: str) -> Built:
    step, info = train_step(params["model"], params["method"], params["r"] or 0, params["batch"],
                            params["seq"], device)
    return Built(step, info)
