"""Run the benchmark suites and check the targets: python -m benchmarks [--device cpu|cuda] [--quick].

Writes <out>/<suite>-<device>.json and .md for every suite run, then targets-<device>.json and .md
from every results file of that device in <out> (so suites can be run one at a time).
"""
from __future__ import annotations

import argparse
import datetime
import os
from pathlib import Path
from typing import Callable

from . import experts, ops, quantized, rank_sweep, report, routing, targets, train_step
from .common import copy_bandwidth, environment
from .worker import measure, measure_live, probe_kernels

SUITES = {"train": train_step, "ops": ops, "sweep": rank_sweep, "routing": routing, "quantized": quantized,
          "experts": experts}
RESULTS = Path("benchmarks/results")  # under the current directory: the checkout's results when run from its root
NOMINAL_BANDWIDTH = (  # bytes/s from NVIDIA's data sheets, most specific name first
    ("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100-SXM4-80GB", 2.039e12),
)


def default_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def repetitions(device: str, quick: bool, module=None) -> tuple[int, int]:
    """(warm runs, timed runs) per configuration; a suite's REPETITIONS {device: (warm, timed)} overrides the
    defaults of its full runs."""
    if not quick and device in getattr(module, "REPETITIONS", {}):
        return module.REPETITIONS[device]
    if device == "cuda":
        return (2, 5) if quick else (5, 30)
    return (1, 2) if quick else (1, 7)


def stem(suite: str, device: str, tiny: bool) -> str:
    return f"{SUITES[suite].NAME}-{device}" + ("-tiny" if tiny else "")


def _bandwidth(env: dict, device: str, records: list[dict], tiny: bool) -> None:
    """The GPU's memory bandwidth (data sheet, else a measured copy) and each bottleneck's share of it."""
    copy = copy_bandwidth(device, mb=64 if tiny else 1024)
    if device == "cuda":
        import torch
        torch.cuda.empty_cache()
    nominal = next((bw for key, bw in NOMINAL_BANDWIDTH if key in env["device_name"]), None) if device == "cuda" else None
    env["copy_bandwidth_gbs"], env["nominal_bandwidth_gbs"] = copy / 1e9, nominal / 1e9 if nominal else None
    for r in records:
        if "bandwidth_gbs" in r:
            r["bandwidth_frac_copy"] = r["bandwidth_gbs"] * 1e9 / copy
            r["bandwidth_frac"] = r["bandwidth_gbs"] * 1e9 / (nominal or copy)


def run_suite(suite: str, device: str, *, quick: bool = False, tiny: bool = False, threads: int | None = None,
              warm: int | None = None, reps: int | None = None, out: Path = RESULTS,
              log: Callable[[str], None] = print) -> dict:
    """Measure one suite, write its results files; returns the result (environment, settings, records)."""
    module = SUITES[suite]
    threads = threads or (2 if device == "cpu" else os.cpu_count() or 1)
    w, n = repetitions(device, quick, module)
    warm, reps = w if warm is None else warm, n if reps is None else reps
    why_not = probe_kernels(device)
    env = environment(device, threads, "bfloat16" if device == "cuda" else "float32")
    env["kernels"] = "available" if why_not is None else f"unavailable ({why_not})"
    env["load_start"] = round(os.getloadavg()[0], 2)
    log(f"{module.NAME} on {device} ({env['device_name']}, {threads} threads, torch {env['torch']}); "
        f"kernels {env['kernels']}; {warm} warm + {reps} timed runs")
    records = []
    groups = module.cases(device, kernels=why_not is None, tiny=tiny, quick=quick)
    if device == "cuda":  # one group: its workers start side by side on the GPU machine's many cores
        groups = [[case for group in groups for case in group]]
    for group in groups:
        for case in group:
            if case.kernels == "require" and why_not is not None:
                case.skip = why_not.splitlines()[0]
        log(f"group: {', '.join(c.name for c in group)}")
        measured = measure(group, device, threads, warm, reps, log)
        if device == "cpu" and getattr(module, "LIVE_MEMORY", False):  # the peak of what the steps hold
            ran = {r["name"] for r in measured if "error" not in r and "skipped" not in r}
            live = measure_live([c for c in group if c.name in ran], threads, warm + 1, log)
            for record in measured:
                if record["name"] in live:
                    record["live_peak_over_base_mb"] = live[record["name"]]
        records += measured
    records = [module.add_rates(r) for r in records]
    env["load_end"] = round(os.getloadavg()[0], 2)
    if suite == "ops":
        _bandwidth(env, device, records, tiny)
    result = {"suite": module.NAME, "environment": env,
              "settings": {"warm": warm, "reps": reps, "quick": quick, "tiny": tiny}, "records": records}
    if hasattr(module, "notes"):  # what the suite's table needs said beside it
        result["notes"] = module.notes(device, tiny, records)
    if hasattr(module, "work_checks"):  # PEFT and adaptune train the same parameters
        result["checks"] = module.work_checks(records)
        for c in result["checks"]:
            log(f"trainable parameters: {c['a']} {c['a_trainable']:,} vs {c['b']} {c['b_trainable']:,}: "
                f"{'equal' if c['equal'] else 'DIFFERENT'}")
    for path in report.write(out, stem(suite, device, tiny), result, report.markdown(result)):
        log(f"wrote {path}")
    return result


ENVIRONMENT_KEYS = ("device_name", "cpu_count", "threads", "dtype", "torch", "cuda", "transformers", "peft", "adaptune",
                    "python")  # what makes two results files' figures comparable


def environments(results: dict[str, dict]) -> list[dict]:
    """The distinct environments the results were measured in, each with the suites (and dates) it holds."""
    found: dict[tuple, dict] = {}
    for suite, result in results.items():
        env = result["environment"]
        key = tuple(env.get(k) for k in ENVIRONMENT_KEYS)
        entry = found.setdefault(key, {**{k: env.get(k) for k in ENVIRONMENT_KEYS}, "suites": {}})
        entry["suites"][suite] = env["date"]
    return list(found.values())


def check_targets(device: str, *, tiny: bool = False, out: Path = RESULTS,
                  log: Callable[[str], None] = print) -> list[dict]:
    """Verdicts for the device's targets from the results files in `out`; writes targets-<device>.*, which
    names the environment of every results file and, where they differ, the file each row came from."""
    stems = {m.NAME: stem(s, device, tiny) for s, m in SUITES.items()}
    results = {name: r for name, s in stems.items() if (r := report.load(out, s))}
    rows = targets.check(results, device)
    if results:
        envs = environments(results)
        for row in rows:
            if row["suite"] in results:
                row["source"] = f"{stems[row['suite']]}.json ({results[row['suite']]['environment']['date']})"
        name = f"targets-{device}" + ("-tiny" if tiny else "")
        checked = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        report.write(out, name, {"device": device, "checked": checked, "environments": envs, "targets": rows},
                     report.targets_markdown(device, rows, envs, checked))
    for r in rows:
        value = f"{r['value']:.3f} ({'≥' if r['at_least'] else '≤'} {r['limit']})" if "value" in r else r["why"]
        log(f"{r['verdict']:7} {r['target']}" + (f" — {r['a']}" if "a" in r else "") + f": {value}")
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--suite", choices=[*SUITES, "all"], default="all")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--quick", action="store_true", help="fewer runs (and ranks / sizes): a rough look")
    p.add_argument("--tiny", action="store_true", help="tiny models and ops, for smoke tests; files get -tiny")
    p.add_argument("--threads", type=int, default=None, help="torch threads per configuration (CPU default 2)")
    p.add_argument("--warm", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    device = args.device or default_device()
    for suite in SUITES if args.suite == "all" else [args.suite]:
        run_suite(suite, device, quick=args.quick, tiny=args.tiny, threads=args.threads, warm=args.warm,
                  reps=args.reps, out=args.out)
    check_targets(device, tiny=args.tiny, out=args.out)
