"""A rank sweep like seed 002's Table 2: adaptune DoRA at r = 1, 4, 12, 24, 128, LoRA at r = 12,
and full fine-tuning of the same BERT-base-shaped model (batch 16 × 64, one AdamW step):
step time, it/s, tokens/s and peak memory (peak RSS on CPU, max_memory_allocated on CUDA).
adaptune runs its kernels when they are built for the device, else the reference.
"""
from __future__ import annotations

from .models import train_step
from .train_step import BATCH, SEQ, TINY_BATCH, TINY_SEQ
from .worker import Built, Case

NAME = "rank_sweep"
RANKS = (1, 4, 12, 24, 128)
QUICK_RANKS = (1, 12, 128)
TINY_RANKS = (1, 4)


def cases(device: str, kernels: bool, tiny: bool = False, quick: bool = False) -> list[list[Case]]:
    model = "bert-tiny" if tiny else "bert-base"
    batch, seq = (TINY_BATCH, TINY_SEQ) if tiny else (BATCH, SEQ)
    path, mode = ("kernels", "require") if kernels else ("reference", "off")
    ranks = TINY_RANKS if tiny else QUICK_RANKS if quick else RANKS
    base = {"model": model, "batch": batch, "seq": seq}
    group = [Case(NAME, f"{model} full", {**base, "method": "full", "r": None, "path": "-"})]
    lora_r = TINY_RANKS[-1] if tiny else 12
    group.append(Case(NAME, f"{model} adaptune-lora r={lora_r}", {**base, "method": "adaptune-lora", "r": lora_r,
                                                                  "path": path}, mode))
    for r in ranks:
        group.append(Case(NAME, f"{model} adaptune-dora r={r}", {**base, "method": "adaptune-dora", "r": r,
                                                                 "path": path}, mode))
    return [group]


def add_rates(record: dict) -> dict:
    from .train_step import add_rates as rates
    return rates(record)


def build(params: dict, device: str) -> Built:
    step, info = train_step(params["model"], params["method"], params["r"] or 0, params["batch"],
                            params["seq"], device)
    return Built(step, info)
