"""The speed and memory targets, in one table, and the check that gives each a verdict.

A target compares a measured record `a` with a yardstick record `b` (ratio a/b of `metric`) or, with
no `b`, checks `metric` of `a` itself. Selectors match record fields; a record that matches `a` gets
its own verdict line (one per adaptune path measured). In `b`, the value SAME takes `a`'s value.

A time ratio is the median of the per-round ratios when both records were timed in the same rounds
(the workers' interleaved design: in round k, a's and b's samples are taken side by side), which
cancels the machine's drift between rounds; the ratio of the two medians is kept beside it.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass

SAME = "same"


@dataclass(frozen=True)
class Target:
    device: str  # cpu | cuda
    suite: str  # train_step | ops | rank_sweep | routing | quantized | experts
    text: str
    a: dict
    b: dict | None
    limit: float
    metric: str = "median_s"
    at_least: bool = False  # True: value >= limit passes (speed-ups, bandwidth); else value <= limit


_BERT = {"model": "bert-base"}
_ADA_DORA = {"impl": "adaptune", "op": "dora"}
_ADA_LORA = {"impl": "adaptune", "op": "lora", "path": SAME, "hidden": SAME}
_PEFT = {"impl": "peft", "hidden": SAME}
_MIXED = {"how": "mixed", "tasks": 8}
_SINGLE = {"how": "single", "method": SAME, "mode": SAME, "path": SAME}
_ROUTING = tuple(
    Target(device, "routing", f"BERT-base shape, T=8 tasks: a mixed batch <= 1.15 x a single-task batch ({method})",
           {**_MIXED, "method": method}, _SINGLE, 1.15)
    for device in ("cpu", "cuda") for method in ("lora", "dora", "adapter")) + tuple(
    Target(device, "routing", "BERT-base shape, T=8 tasks: LoRA inference, adaptune route <= 1.0 x PEFT adapter_names",
           {**_MIXED, "method": "lora", "mode": "fwd"}, {"how": "peft", "tasks": 8}, 1.0)
    for device in ("cpu", "cuda"))
_NF4_LORA = {"model": "llama-8l", "base": "nf4", "method": "adaptune-lora"}  # with and without checkpointing
_SAME_CKPT = {"model": "llama-8l", "checkpointing": SAME}
# the peak memory a step's targets read: CUDA's max_memory_allocated; on the CPU the peak RSS over the process's
# baseline, and the same with freed memory unmapped (worker.measure_live: what the step holds, as on CUDA)
_QUANT_MEMORY = (("cpu", "peak_over_base_mb", "peak memory"), ("cpu", "live_peak_over_base_mb", "live peak memory"),
                 ("cuda", "peak_mb", "peak memory"))
_QUANT_STEP = "Llama 8 layers (hidden 2048), LoRA r=16 on q/k/v/o/gate/up/down, step"
_FLOAT = {"cpu": "fp32", "cuda": "bf16"}
_QUANTIZED = tuple(t for device, memory, what in _QUANT_MEMORY for t in (
    Target(device, "quantized", f"{_QUANT_STEP} {what}: adaptune LoRA on nf4 <= 0.35 x adaptune LoRA on the "
           f"{_FLOAT[device]} base",
           _NF4_LORA, {**_SAME_CKPT, "base": "float", "method": "adaptune-lora"}, 0.35, metric=memory),
    Target(device, "quantized", f"{_QUANT_STEP} {what}: adaptune LoRA on nf4 <= 1.0 x PEFT LoRA on nf4",
           _NF4_LORA, {**_SAME_CKPT, "base": "nf4", "method": "peft-lora"}, 1.0, metric=memory),
    Target(device, "quantized", "Llama 24 layers (hidden 2048; 89% of the weights in the layers), LoRA r=16, "
           f"checkpointed step {what}: adaptune LoRA on nf4 <= 0.35 x adaptune LoRA on the {_FLOAT[device]} base",
           {**_NF4_LORA, "model": "llama-24l"}, {"model": "llama-24l", "checkpointing": SAME, "base": "float",
                                                 "method": "adaptune-lora"}, 0.35, metric=memory))) + tuple(
    t for device in ("cpu", "cuda") for t in (
        Target(device, "quantized", f"{_QUANT_STEP}: adaptune LoRA on nf4 <= 1.0 x PEFT LoRA on nf4",
               _NF4_LORA, {**_SAME_CKPT, "base": "nf4", "method": "peft-lora"}, 1.0),
        Target(device, "quantized", f"{_QUANT_STEP}: adaptune DoRA on nf4 <= 1.1 x adaptune LoRA on nf4",
               {"model": "llama-8l", "base": "nf4", "method": "adaptune-dora"}, {**_NF4_LORA, "checkpointing": SAME},
               1.1)))
_EXPERTS = tuple(
    Target(device, "experts", "Mixtral-shaped MoE block, LoRA r=16 on every expert, fwd+bwd: adaptune <= 0.6 x PEFT "
           "target_parameters", {"impl": "adaptune", "method": "lora", "path": "grouped"},
           {"impl": "peft", "method": "lora", "tokens": SAME}, 0.6)
    for device in ("cpu", "cuda"))
_LLAMA = {"model": "llama-1b"}
_SQUARE = "square linear (4096², CUDA also 8192²) r=16 fwd+bwd"
TARGETS = _ROUTING + (
    Target("cpu", "train_step", "BERT-base step: adaptune DoRA <= 0.9 x PEFT DoRA",
           {**_BERT, "method": "adaptune-dora"}, {**_BERT, "method": "peft-dora"}, 0.9),
    Target("cpu", "train_step", "BERT-base step: adaptune LoRA <= 1.0 x PEFT LoRA",
           {**_BERT, "method": "adaptune-lora"}, {**_BERT, "method": "peft-lora"}, 1.0),
    Target("cpu", "train_step", "BERT-base step: adaptune DoRA <= 1.05 x adaptune LoRA",
           {**_BERT, "method": "adaptune-dora"}, {**_BERT, "method": "adaptune-lora", "path": SAME}, 1.05),
    Target("cpu", "ops", f"{_SQUARE}: adaptune DoRA <= 1.05 x adaptune LoRA", _ADA_DORA, _ADA_LORA, 1.05),
    Target("cpu", "ops", f"{_SQUARE}: adaptune DoRA <= 0.45 x PEFT DoRA", _ADA_DORA, {**_PEFT, "op": "dora"}, 0.45),
    Target("cuda", "ops", f"{_SQUARE}: adaptune DoRA <= 1.10 x adaptune LoRA", _ADA_DORA, _ADA_LORA, 1.10),
    Target("cuda", "ops", f"{_SQUARE}: adaptune DoRA <= 0.6 x PEFT DoRA", _ADA_DORA, {**_PEFT, "op": "dora"}, 0.6),
    Target("cuda", "ops", f"{_SQUARE} peak memory: adaptune DoRA <= 1.05 x adaptune LoRA",
           _ADA_DORA, _ADA_LORA, 1.05, metric="peak_mb"),
    Target("cuda", "ops", f"{_SQUARE}: adaptune LoRA <= 0.9 x PEFT LoRA",
           {"impl": "adaptune", "op": "lora"}, {**_PEFT, "op": "lora"}, 0.9),
    Target("cuda", "ops", "bottleneck fwd: fused >= 1.5 x eager (eager time / fused time)",
           {"op": "bottleneck", "mode": "fwd", "impl": "eager"},
           {"op": "bottleneck", "mode": "fwd", "path": "kernels", "bottleneck": SAME, "hidden": SAME}, 1.5,
           at_least=True),
    Target("cuda", "ops", "bottleneck fwd: fused >= 70% of the GPU's memory bandwidth",
           {"op": "bottleneck", "mode": "fwd", "path": "kernels"}, None, 0.70, metric="bandwidth_frac",
           at_least=True),
    Target("cuda", "train_step", "Llama-1B step: PEFT LoRA <= 0.70 x full fine-tuning",
           {**_LLAMA, "method": "peft-lora"}, {**_LLAMA, "method": "full"}, 0.70),
    Target("cuda", "train_step", "Llama-1B step: adaptune LoRA <= 0.70 x full fine-tuning",
           {**_LLAMA, "method": "adaptune-lora"}, {**_LLAMA, "method": "full"}, 0.70),
    Target("cuda", "train_step", "Llama-1B step: adaptune LoRA <= 1.0 x PEFT LoRA",
           {**_LLAMA, "method": "adaptune-lora"}, {**_LLAMA, "method": "peft-lora"}, 1.0),
    Target("cuda", "train_step", "Llama-1B step: adaptune DoRA <= 0.9 x PEFT DoRA",
           {**_LLAMA, "method": "adaptune-dora"}, {**_LLAMA, "method": "peft-dora"}, 0.9),
    Target("cuda", "train_step", "Llama-1B step: adaptune DoRA <= 1.10 x adaptune LoRA",
           {**_LLAMA, "method": "adaptune-dora"}, {**_LLAMA, "method": "adaptune-lora", "path": SAME}, 1.10),
    Target("cuda", "train_step", "Llama-1B step peak memory: adaptune DoRA <= 1.05 x PEFT LoRA",
           {**_LLAMA, "method": "adaptune-dora"}, {**_LLAMA, "method": "peft-lora"}, 1.05, metric="peak_mb"),
) + _QUANTIZED + _EXPERTS


def _matches(record: dict, selector: dict) -> bool:
    return all(record.get(k) == v for k, v in selector.items())


def _measured(record: dict, metric: str) -> bool:
    return record.get(metric) is not None and "skipped" not in record and "error" not in record


def paired_ratio(a: dict, b: dict) -> float | None:
    """Median over rounds of a's time / b's time in the same round; None without aligned samples."""
    ta, tb = a.get("times_s"), b.get("times_s")
    if not ta or not tb or len(ta) != len(tb):
        return None
    return statistics.median(x / y for x, y in zip(ta, tb))


def check(results: dict[str, dict], device: str) -> list[dict]:
    """One verdict row per target and matching record. `results`: suite name -> result (run.py's)."""
    rows = []
    for t in (t for t in TARGETS if t.device == device):
        records = results.get(t.suite, {}).get("records", [])
        found = [r for r in records if _matches(r, t.a)]
        if not found:
            rows.append({"target": t.text, "suite": t.suite, "verdict": "MISSING", "why": "no measured record"})
        for a in found:
            row = {"target": t.text, "suite": t.suite, "a": a["name"], "limit": t.limit, "metric": t.metric,
                   "at_least": t.at_least}
            b = None
            if t.b is not None:
                sel = {k: a.get(k) if v == SAME else v for k, v in t.b.items()}
                b = next((r for r in records if _matches(r, sel) and r is not a), None)
                row["b"] = b["name"] if b else None
            if not _measured(a, t.metric) or (t.b is not None and (b is None or not _measured(b, t.metric))):
                why = a.get("skipped") or a.get("error") or (b or {}).get("skipped") or "yardstick not measured"
                rows.append({**row, "verdict": "MISSING", "why": str(why).splitlines()[0]})
                continue
            value = a[t.metric] / b[t.metric] if b is not None else a[t.metric]
            paired = paired_ratio(a, b) if b is not None and t.metric == "median_s" else None
            if paired is not None:
                row["ratio_of_medians"], value = value, paired
            ok = value >= t.limit if t.at_least else value <= t.limit
            row.update(value=value, a_value=a[t.metric], b_value=b[t.metric] if b else None,
                       verdict="PASS" if ok else "FAIL")
            rows.append(row)
    return rows
