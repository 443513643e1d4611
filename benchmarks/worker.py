"""One subprocess per configuration, timed in interleaved rounds.

Each case is built in its own fresh process, so its peak memory (CPU peak RSS, CUDA
max_memory_allocated) belongs to that configuration alone. The parent then asks the workers for
one step at a time, round-robin with a rotating order (A B C, B C A, ...): every case sees the same
machine drift, and ratios between cases measured side by side stay meaningful.
"""
from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import traceback
from dataclasses import dataclass, field
from typing import Callable

from .common import peak_memory_mb, reset_peak, summary, timed

# adaptune's kernel modes (ADAPTUNE_KERNELS / adaptune.ops.use_kernels): "off" = the reference only,
# "require" = the compiled kernels or the case is skipped, "auto" = kernels when built
PRELOAD = ["torch", "transformers.models.bert.modeling_bert", "transformers.models.gpt2.modeling_gpt2", "peft"]


def context(device: str):
    """CPU: workers fork from a server that has imported torch, transformers and PEFT (not adaptune,
    whose kernel mode is set per worker before its import), so starting one costs milliseconds.
    CUDA: plain spawn, so no worker inherits a process in which a library has touched the driver."""
    if device == "cuda" or "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


@dataclass
class Case:
    suite: str  # the module under benchmarks/ whose build() makes the step: train_step, ops, rank_sweep
    name: str  # unique within a run, e.g. "bert-base adaptune-dora [reference]"
    params: dict = field(default_factory=dict)  # copied into the result record
    kernels: str = "off"
    inner: int = 1  # steps per timed sample (short GPU ops): the sample is their mean
    skip: str | None = None  # why it cannot run here (kernels not built): listed as skipped, never started


@dataclass
class Built:
    step: Callable[[], object]  # one timed unit of work
    info: dict = field(default_factory=dict)  # facts about the work: trainable parameters, tokens, bytes


class Skip(Exception):
    """A case that cannot run here (no kernels, no PEFT); the message says why."""


def kernel_path(device: str, mode: str) -> str:
    """Sets adaptune's kernel mode in this process and says which path its ops take: "reference" or
    "kernels" (building the extension on first use). Raises Skip when `require` cannot be met."""
    from adaptune import ops
    ops.use_kernels(mode)
    if mode == "off":
        return "reference"
    paths = {op: ops.path(op, device) for op in ("lora", "dora", "bottleneck")}
    missing = {op: why for op, (which, why) in paths.items() if which != "kernel"}
    if missing and mode == "require":
        raise Skip(f"kernels unavailable on {device}: " + "; ".join(f"{op}: {why}" for op, why in missing.items()))
    return "reference" if missing else "kernels"


def _probe(conn, device: str) -> None:
    try:
        kernel_path(device, "require")
        conn.send(None)
    except Exception as e:
        conn.send(str(e))


def probe_kernels(device: str) -> str | None:
    """None when adaptune's kernels run on `device`, else why not (checked in a fresh process)."""
    ctx = context(device)
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_probe, args=(child, device), daemon=True)
    _start(proc, "require")
    kind, payload = _ask(parent, proc, reply=True)
    proc.join()
    return payload if kind == "reply" else f"probe failed: {payload}"


def _start(proc, kernels: str, env: dict[str, str] | None = None) -> None:
    """Starts `proc` with ADAPTUNE_KERNELS=kernels (and `env`) in its inherited environment, ours left as it was."""
    settings = {"ADAPTUNE_KERNELS": kernels, **(env or {})}
    previous = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        proc.start()
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _serve(conn, case: Case, device: str, threads: int) -> None:
    os.environ["ADAPTUNE_KERNELS"] = case.kernels
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import warnings

    import torch
    import transformers
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices from the libraries compared
    torch.set_num_threads(threads)
    for name in PRELOAD:  # what a forked worker has from its server; a spawned one imports it here, so that
        try:  # every process's baseline holds the same libraries
            importlib.import_module(name)
        except ImportError:  # PEFT not installed: its cases are skipped
            pass
    base_mb = peak_memory_mb("cpu")  # the process's peak RSS before the build
    try:
        kernel_path(device, case.kernels)  # a case that asks for kernels gets them or is skipped
        built = importlib.import_module(f"benchmarks.{case.suite}").build(case.params, device)
    except Skip as e:
        conn.send(("skip", str(e)))
        return
    except Exception:
        conn.send(("error", traceback.format_exc(limit=6)))
        return

    def repeat() -> None:
        for _ in range(case.inner):
            built.step()

    if device == "cuda":
        torch.cuda.empty_cache()  # what the build freed goes back to the device: the workers share one GPU
    reset_peak(device)
    conn.send(("ready", built.info))
    while True:
        command, n = conn.recv()
        if command == "stop":
            peak = peak_memory_mb(device)
            stats = {"peak_mb": peak} if device == "cuda" else {"peak_mb": peak, "rss_base_mb": base_mb,
                                                                "peak_over_base_mb": peak - base_mb}
            conn.send(("stats", stats))
            return
        try:
            conn.send(("times", [timed(repeat, device) / case.inner for _ in range(n)]))
        except Exception:
            conn.send(("error", traceback.format_exc(limit=6)))
            return


def _ask(conn, proc, reply: bool = False) -> tuple[str, object]:
    while not conn.poll(1.0):
        if not proc.is_alive() and not conn.poll(0):
            return "error", f"worker exited with code {proc.exitcode}"
    return ("reply", conn.recv()) if reply else conn.recv()


def measure(cases: list[Case], device: str, threads: int, warm: int, reps: int,
            log: Callable[[str], None] = print, env: dict[str, str] | None = None) -> list[dict]:
    """Build every case in its own process, run `warm` untimed steps each, then `reps` interleaved
    rounds of one timed step per case. Returns one record per case, in the order given; a case with `skip`
    set is recorded as skipped without a process. `env`: variables every process starts with (spawned, then:
    a forked process keeps what its server read when it started)."""
    ctx = mp.get_context("spawn") if env else context(device)
    records = {c.name: {"name": c.name, "suite": c.suite, "kernels": c.kernels, "inner": c.inner, **c.params}
               for c in cases}
    live: dict[str, tuple] = {}
    started: list[tuple[Case, object, object]] = []

    def ready(case: Case, parent, proc) -> None:
        kind, payload = _ask(parent, proc)
        if kind == "ready":
            records[case.name].update(payload)
            live[case.name] = (parent, proc)
            log(f"  built {case.name}" + (f" (trainable {payload['trainable']:,})" if "trainable" in payload else ""))
        else:
            records[case.name]["skipped" if kind == "skip" else "error"] = payload
            log(f"  {'skip' if kind == 'skip' else 'ERROR'} {case.name}: {payload}")
            proc.join()

    for case in cases:
        if case.skip:
            records[case.name]["skipped"] = case.skip
            log(f"  skip {case.name}: {case.skip}")
            continue
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_serve, args=(child, case, device, threads), daemon=True)
        _start(proc, case.kernels, env)  # inherited by the child before any import
        if device == "cpu":  # built one after another: builds do not compete for the few cores
            ready(case, parent, proc)
        else:  # a GPU machine's many cores start the spawned workers (imports, builds) side by side
            started.append((case, parent, proc))
    for case, parent, proc in started:
        ready(case, parent, proc)
    times: dict[str, list[float]] = {name: [] for name in live}

    def step_all(order: list[str], n: int, keep: bool) -> None:
        for name in order:
            if name not in live:
                continue
            conn, proc = live[name]
            conn.send(("run", n))
            kind, payload = _ask(conn, proc)
            if kind != "times":
                records[name]["error"] = payload
                log(f"  ERROR {name}: {payload}")
                del live[name]
            elif keep:
                times[name].extend(payload)
            else:  # the warm steps' times: what the first step costs beyond the others (one-time work)
                records[name]["warm_s"] = [round(t, 6) for t in payload]

    names = list(live)
    step_all(names, warm, keep=False)
    for i in range(reps):
        k = i % max(len(names), 1)
        step_all(names[k:] + names[:k], 1, keep=True)
        log(f"  round {i + 1}/{reps}: " + ", ".join(f"{n.split(' ', 1)[-1]} {times[n][-1]:.3f}s"
                                                    for n in names if n in live and times[n]))
    for name, (conn, proc) in live.items():
        conn.send(("stop", 0))
        kind, payload = _ask(conn, proc)
        if kind == "stats":
            records[name].update(payload)
        proc.join(timeout=30)
        if times[name]:
            records[name].update(summary(times[name]))
    return [records[c.name] for c in cases]


# glibc reads this when a process starts: every allocation over 128 KiB gets its own mapping, returned to the system
# when freed, the threshold fixed (by default it rises to 32 MiB as large blocks are freed, which are then kept)
UNMAPPED = {"MALLOC_MMAP_THRESHOLD_": str(128 * 2**10)}


def measure_live(cases: list[Case], threads: int, steps: int, log: Callable[[str], None] = print) -> dict[str, float]:
    """CPU: each case built again in a spawned process started with UNMAPPED, then `steps` untimed steps. Its peak
    RSS over its baseline then counts the memory the steps hold, as CUDA's max_memory_allocated does, and not what
    the allocator kept of what they freed (with glibc's defaults, over a GB on a large model's step). Returns
    {case name: MiB} for the cases that ran; nothing where the C library is not glibc. A slow pass (every
    allocation over 128 KiB faults its pages anew), so it is never timed."""
    import platform
    if platform.libc_ver()[0] != "glibc":
        log("live memory not measured: it needs glibc's MALLOC_MMAP_THRESHOLD_")
        return {}
    found = {r["name"]: r["peak_over_base_mb"] for r in measure(cases, "cpu", threads, steps, 0, log, UNMAPPED)
             if "peak_over_base_mb" in r}
    for name, mb in found.items():
        log(f"  live memory {name}: {mb:,.0f} MB over baseline")
    return found
