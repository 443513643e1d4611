"""Results files: JSON (everything measured) and markdown (the tables), written atomically."""
from __future__ import annotations

import json
from pathlib import Path

from adaptune.files import atomic_write

_MEMORY = {"cpu": "peak RSS MB", "cuda": "peak alloc MB"}
_MEMORY_NOTE = {"cpu": "peak RSS of the configuration's process (ru_maxrss), the Python + torch + transformers "
                       "baseline included; 'over baseline' subtracts the peak RSS read before the build",
                "cuda": "torch.cuda.max_memory_allocated over the warm and timed runs (weights included)"}
COLUMNS = {  # suite: [(header, record key, format)]
    "train_step": [("trainable", "trainable", "{:,}"), ("median s", "median_s", "{:.3f}"),
                   ("min–max s", None, None), ("it/s", "it_per_s", "{:.2f}"),
                   ("tokens/s", "tokens_per_s", "{:,.0f}"), ("MEM", "peak_mb", "{:,.0f}"),
                   ("over baseline MB", "peak_over_base_mb", "{:,.0f}")],
    "rank_sweep": [("r", "r", "{}"), ("trainable", "trainable", "{:,}"), ("median s", "median_s", "{:.3f}"),
                   ("min–max s", None, None), ("it/s", "it_per_s", "{:.2f}"),
                   ("tokens/s", "tokens_per_s", "{:,.0f}"), ("MEM", "peak_mb", "{:,.0f}"),
                   ("over baseline MB", "peak_over_base_mb", "{:,.0f}")],
    "ops": [("tokens", "tokens", "{:,}"), ("median ms", "median_ms", "{:.3f}"), ("min–max ms", None, None),
            ("tokens/s", "tokens_per_s", "{:,.0f}"), ("GB/s", "bandwidth_gbs", "{:,.1f}"),
            ("MEM", "peak_mb", "{:,.0f}"), ("over baseline MB", "peak_over_base_mb", "{:,.0f}")],
    "quantized": [("trainable", "trainable", "{:,}"), ("weights MB", "weights_mb", "{:,.0f}"),
                  ("first step s", "first_step_s", "{:.3f}"), ("median s", "median_s", "{:.3f}"),
                  ("min–max s", None, None), ("tokens/s", "tokens_per_s", "{:,.0f}"), ("MEM", "peak_mb", "{:,.0f}"),
                  ("over baseline MB", "peak_over_base_mb", "{:,.0f}"),
                  ("live over baseline MB", "live_peak_over_base_mb", "{:,.0f}")],
    "experts": [("tokens", "tokens", "{:,}"), ("trainable", "trainable", "{:,}"), ("median s", "median_s", "{:.3f}"),
                ("min–max s", None, None), ("tokens/s", "tokens_per_s", "{:,.0f}"), ("MEM", "peak_mb", "{:,.0f}"),
                ("over baseline MB", "peak_over_base_mb", "{:,.0f}")],
    "routing": [("tasks", "tasks", "{}"), ("trainable", "trainable", "{:,}"), ("median ms", "median_ms", "{:.1f}"),
                ("min–max ms", None, None), ("tokens/s", "tokens_per_s", "{:,.0f}"), ("MEM", "peak_mb", "{:,.0f}"),
                ("over baseline MB", "peak_over_base_mb", "{:,.0f}")],
}


def _cell(record: dict, key: str | None, fmt: str | None, ms: bool) -> str:
    if key is None:  # the spread of the timed runs
        if "min_s" not in record:
            return ""
        k = 1000 if ms else 1
        return f"{record['min_s'] * k:.3f}–{record['max_s'] * k:.3f}"
    if key == "median_ms":
        return f"{record['median_s'] * 1000:.3f}" if "median_s" in record else ""
    value = record.get(key)
    return "" if value is None else fmt.format(value)


def _header(result: dict) -> list[str]:
    env, s = result["environment"], result["settings"]
    return [f"# {result['suite']} — {env['device']} ({env['device_name']})", "",
            f"- date: {env['date']}; torch {env['torch']}, transformers {env['transformers']}, "
            f"peft {env['peft']}, adaptune {env['adaptune']}, python {env['python']}",
            f"- threads: {env['threads']} of {env['cpu_count']} CPUs; dtype {env['dtype']}"
            + (f"; CUDA {env['cuda']}, {env.get('gpu_memory_gb')} GiB" if env.get("cuda") else ""),
            f"- adaptune kernels: {env['kernels']}",
            f"- load average (1 min) at start / end: {env.get('load_start')} / {env.get('load_end')} "
            "(other jobs share this machine)",
            f"- {s['warm']} warm run(s), then {s['reps']} timed runs per configuration, interleaved round-robin; "
            "each configuration in its own process; medians quoted, min–max is the spread",
            "- memory: " + _MEMORY_NOTE[env["device"]]] + [f"- {note}" for note in result.get("notes", [])] + [""]


def table(result: dict) -> tuple[list[str], list[list[str]]]:
    """Column headers and one row of cells per configuration (markdown here, rich in `adaptune bench`)."""
    device = result["environment"]["device"]
    cols = COLUMNS[result["suite"]]
    ms = result["suite"] in ("ops", "routing")
    if device == "cuda":  # max_memory_allocated has no process baseline, and counts only what is held
        cols = [c for c in cols if c[1] not in ("peak_over_base_mb", "live_peak_over_base_mb")]
    heads = ["configuration"] + [_MEMORY[device] if h == "MEM" else h for h, _, _ in cols]
    rows = []
    for r in result["records"]:
        if "skipped" in r or "error" in r:
            why = str(r.get("skipped") or r.get("error")).strip().splitlines()[-1]
            rows.append([r["name"], f"{'skipped' if 'skipped' in r else 'error'}: {why}"] + [""] * (len(cols) - 1))
        else:
            rows.append([r["name"]] + [_cell(r, k, f, ms) for _, k, f in cols])
    return heads, rows


def markdown(result: dict) -> str:
    heads, rows = table(result)
    lines = _header(result) + ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    if result.get("checks"):
        lines.append("")
    for c in result.get("checks", []):
        lines.append(f"- same work: {c['a']} trains {c['a_trainable']:,} parameters, {c['b']} "
                     f"{c['b_trainable']:,}: {'equal' if c['equal'] else 'DIFFERENT'}")
    return "\n".join(lines) + "\n"


def _environment_line(env: dict) -> str:
    suites = ", ".join(f"{suite} ({date})" for suite, date in env["suites"].items())
    return (f"{suites}: {env['device_name']}, {env['threads']} threads of {env['cpu_count']} CPUs, {env['dtype']}; "
            f"torch {env['torch']}" + (f" (CUDA {env['cuda']})" if env.get("cuda") else "")
            + f", transformers {env['transformers']}, peft {env['peft']}, adaptune {env['adaptune']}")


def targets_markdown(device: str, rows: list[dict], envs: list[dict], checked: str) -> str:
    names = " / ".join(dict.fromkeys(env["device_name"] for env in envs))
    lines = [f"# targets — {device} ({names})", "", f"- checked {checked} from the results files of this directory"]
    if len(envs) == 1:
        lines.append(f"- one environment: {_environment_line(envs[0])}")
    else:
        lines.append(f"- **{len(envs)} environments**: the files were measured apart, so rows from different "
                     "files are not comparable; each row names its file")
        lines += [f"  - {_environment_line(env)}" for env in envs]
    lines += ["- value = measured / yardstick (or the measured figure itself); see each suite's file for the "
              "conditions; for times measured side by side, value is the median of the per-round ratios (the "
              "verdict's figure) and 'ratio of medians' the two medians' ratio", "",
              "| verdict | target | measured | yardstick | value | ratio of medians | limit | from |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        value = f"{r['value']:.3f}" if "value" in r else r.get("why", "")
        of_medians = f"{r['ratio_of_medians']:.3f}" if "ratio_of_medians" in r else ""
        limit = f"{'≥' if r.get('at_least') else '≤'} {r['limit']}" if "limit" in r else ""
        lines.append(f"| {r['verdict']} | {r['target']} | {r.get('a', '')} | {r.get('b') or ''} | {value} | "
                     f"{of_medians} | {limit} | {r.get('source', '')} |")
    return "\n".join(lines) + "\n"


def write(out: Path, stem: str, result: dict, md: str) -> list[Path]:
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    atomic_write(paths[0], lambda tmp: tmp.write_text(json.dumps(result, indent=1, default=str) + "\n"))
    atomic_write(paths[1], lambda tmp: tmp.write_text(md))
    return paths


def load(out: Path, stem: str) -> dict | None:
    path = out / f"{stem}.json"
    return json.loads(path.read_text()) if path.exists() else None
