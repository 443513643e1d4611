"""The per-dataset heads of a multitask run and its parameter accounting (the % updated / % stored columns)."""
from __future__ import annotations

import torch
from torch import nn

from ...adaptation import Adaptation
from ...attach import counts
from ..common.methods import Method
from ...quantized import parameter_count as count_base

ACCOUNTING = ("% updated per task = (parameters trained for that task: shared components + the task's own "
              "components + its head; for full fine-tuning every base parameter) / base parameters. "
              "% stored = (extra parameters kept for all tasks together: shared components once + every task's "
              "components + every head) / base parameters; full fine-tuning stores one fine-tuned model for all "
              "tasks in place of the base, counted as 0% extra as in seed 004 Table 2, plus its heads. A quantized "
              "base (--quantize) counts its parameters as the float base has them (out × in per weight).")


def base_params(model: nn.Module, adaptation: Adaptation | None) -> int:
    """The base's parameters, as in float (a quantized weight counts out × in)."""
    own = {id(p) for p in adaptation.parameters()} if adaptation is not None else set()
    return count_base(model, own)


def accounting(method: Method, model: nn.Module, adaptation: Adaptation | None, heads: nn.ModuleDict) -> dict:
    """Parameter counts of the results table (see ACCOUNTING)."""
    base = base_params(model, adaptation)
    head = {t: sum(p.numel() for p in h.parameters()) for t, h in heads.items()}
    if adaptation is not None:
        c = counts(adaptation)
        updated = {t: c.trainable(t) + head[t] for t in heads}
        stored = c.stored + sum(head.values())
        components = {"shared": c.shared, "per_task": dict(c.per_task)}
    else:
        updated = {t: (base if method.name == "full" else 0) + head[t] for t in heads}
        stored = sum(head.values())
        components = {"shared": 0, "per_task": {t: 0 for t in heads}}
    return {"base": base, "heads": head, "components": components, "updated": updated,
            "pct_updated": {t: 100.0 * n / base for t, n in updated.items()},
            "stored": stored, "pct_stored": 100.0 * stored / base, "how": ACCOUNTING}


def make_heads(hidden: int, sizes: dict[str, int], seed: int) -> nn.ModuleDict:
    torch.manual_seed(seed)
    return nn.ModuleDict({t: nn.Linear(hidden, n) for t, n in sizes.items()})
