"""Phase 1 of benchmarks/gpu_check.sh: where the check runs, and whether adaptune's extension builds there.

python -m benchmarks.gpu_check OUTDIR DEVICE writes OUTDIR/environment.json (the machine, the GPU, the
versions, the build's outcome) and OUTDIR/build.log (the ninja file with the compiler flags and target
architectures; on a failed build, ninja's whole output). Exits 1 if the extension does not build for DEVICE.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from .common import environment

TOOLS = {"nvcc": ["nvcc", "--version"], "ninja": ["ninja", "--version"],
         "nvidia-smi": ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                        "--format=csv,noheader"]}


def _tool(argv: list[str]) -> str:
    """The last line a tool prints about itself, or why it could not be asked."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable: {e}"
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[-1] if lines else f"exit {done.returncode}"


def _gpu(device: str) -> dict:
    """What environment() does not record of the GPU (it has its name and memory)."""
    import torch
    if device != "cuda":
        return {}
    props = torch.cuda.get_device_properties(0)
    return {"capability": f"sm_{props.major}{props.minor}", "multiprocessors": props.multi_processor_count,
            "arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") or "(unset: the visible GPU's)"}


def _build_log(path: str | None, device: str, reason: str) -> str:
    """The build's ninja file (flags, -gencode targets); on failure, ninja's own verbose output."""
    from adaptune.ops import build
    directory = Path(path).parent if path else build.build_dir(device)
    parts = [f"# adaptune extension for {device}: {reason}", f"# build directory: {directory}"]
    ninja = directory / "build.ninja"
    parts.append(ninja.read_text() if ninja.is_file() else "# no build.ninja")
    if path is None and ninja.is_file():
        done = subprocess.run(["ninja", "-v", "-C", str(directory)], capture_output=True, text=True, timeout=600)
        parts.append(f"# ninja -v (exit {done.returncode}):\n{done.stdout}{done.stderr}")
    return "\n".join(parts) + "\n"


def main(argv: list[str]) -> int:
    out, device = Path(argv[0]), argv[1]
    out.mkdir(parents=True, exist_ok=True)
    env = environment(device, os.cpu_count() or 1, "bfloat16" if device == "cuda" else "float32")
    env["tools"] = {name: _tool(command) for name, command in TOOLS.items()}
    env["gpu"] = _gpu(device)
    from adaptune import ops
    start = time.perf_counter()
    builds = ops.builds()
    seconds = round(time.perf_counter() - start, 1)
    chosen = builds[device]
    env["build"] = {d: {"ok": b.ok, "reason": b.reason, "path": b.path} for d, b in builds.items()}
    env["build"]["seconds"] = seconds
    log = _build_log(chosen.path, device, chosen.reason)
    env["build"]["targets"] = sorted(set(re.findall(r"code=(sm_\d+a?)", log)))
    (out / "build.log").write_text(log)
    (out / "environment.json").write_text(json.dumps(env, indent=1, default=str) + "\n")
    gpu = env["gpu"]
    print(f"{env['device_name']}" + (f" ({gpu['capability']}, {env['gpu_memory_gb']} GiB)" if gpu else "")
          + f"; torch {env['torch']}, CUDA {env['cuda']}, transformers {env['transformers']}, peft {env['peft']}")
    print(f"extension for {device}: {'built' if chosen.ok else 'FAILED'} in {seconds} s"
          + (f", targets {', '.join(env['build']['targets'])}" if env["build"]["targets"] else "")
          + ("" if chosen.ok else f": {chosen.reason}"))
    return 0 if chosen.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
