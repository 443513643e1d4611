"""What machine a result was measured on: the CPU's model name, the device a run used and its peak memory.
Shared by the experiments' results files and the benchmarks (this module imports torch only when asked for a
device's name or memory)."""
from __future__ import annotations

import os
import platform
import resource
import sys
import time


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what platform reports."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, MiB (Linux reports kB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def device_info(device: str) -> dict:
    """The device a run used (cpu, cuda or cuda:N): its name, threads, versions and the time of writing."""
    import torch
    import transformers

    name = torch.cuda.get_device_name(torch.device(device)) if device != "cpu" else cpu_name()
    return {"device": device, "name": name, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}


def peak_memory_mb(device: str) -> tuple[float, str]:
    """(MiB, how it was measured): torch's peak allocation on a CUDA device, else the process's peak RSS."""
    if device != "cpu":
        import torch

        return torch.cuda.max_memory_allocated(torch.device(device)) / 2**20, "torch.cuda.max_memory_allocated"
    return peak_rss_mb(), "peak resident set size of the process"
