"""Timing, peak memory, and the environment record every result carries.

adaptune is imported inside the functions that need it: a worker process sets its kernel mode
before adaptune is first imported there (see worker.py)."""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from typing import Callable


def sync(device: str) -> None:
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> float:
    """Seconds one call of `fn` takes, the device drained before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def summary(times: list[float]) -> dict:
    """Median, min and max of the timed runs (the median is the figure to quote)."""
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "runs": len(times), "times_s": [round(t, 6) for t in times]}


def reset_peak(device: str) -> None:
    if device == "cuda":
        import torch
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mb(device: str) -> float:
    """CUDA: max_memory_allocated since the last reset; CPU: peak RSS of the process."""
    if device == "cuda":
        import torch
        return torch.cuda.max_memory_allocated() / 2**20
    from adaptune.experiments.common.machine import peak_rss_mb
    return peak_rss_mb()


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # not installed
        return None


def environment(device: str, threads: int, dtype: str) -> dict:
    """Where and when a result was measured."""
    import torch

    import adaptune
    from adaptune.experiments.common.machine import cpu_name
    env = {
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if device == "cuda" else cpu_name(),
        "cpu_model": cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "dtype": dtype,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device == "cuda" else None,
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "adaptune": adaptune.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device == "cuda":
        env["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return env


def copy_bandwidth(device: str, mb: int = 1024, reps: int = 10) -> float:
    """Achieved memory bandwidth in bytes/s of a plain tensor copy (read + write), median of reps."""
    import torch
    n = mb * 2**20 // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = [timed(lambda: dst.copy_(src), device) for _ in range(reps)]
    return 2 * src.numel() * src.element_size() / statistics.median(times)
