"""Builds and loads the C++/CUDA extension (csrc/) once per process, with torch's JIT loader and ninja.

The build directory is keyed on the sources' hash, the torch version and the device architecture:
`$ADAPTUNE_BUILD_DIR/<key>` (default `~/.cache/adaptune/ext/<key>`), so a cached build is reused
across processes and sessions. An fcntl lock keeps two processes from building into the same
directory at once. `torch.utils.cpp_extension` is imported only when a build is attempted.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parents[2] / "csrc"
NAME = "adaptune_ops"
CFLAGS = ["-O3"]
CUDA_FLAGS = ["-O3", "--expt-relaxed-constexpr"]


@dataclass(frozen=True)
class Build:
    """The outcome of one build attempt for one device type: a loaded library, or the reason it is not."""
    device: str
    ok: bool
    reason: str
    path: str | None = None


def sources(device: str) -> list[Path]:
    """Translation units for a device type: the schemas and CPU kernels always, the .cu files for CUDA."""
    files = [CSRC / "schema.cpp", CSRC / "cpu" / "ops.cpp"]
    return files + sorted((CSRC / "cuda").glob("*.cu")) if device == "cuda" else files


def arch(device: str) -> str:
    if device == "cuda":
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return "cuda" + "-".join(f"sm{a}{b}" for a, b in caps) + f"-cu{torch.version.cuda}"
    return f"cpu-{platform.machine()}"


def build_dir(device: str) -> Path:
    """`$ADAPTUNE_BUILD_DIR/<key>`, default root `~/.cache/adaptune/ext`."""
    digest = hashlib.sha256()
    for path in sorted(CSRC.rglob("*")):
        if path.is_file() and path.suffix in {".cpp", ".cu", ".h", ".cuh"}:
            digest.update(path.relative_to(CSRC).as_posix().encode() + b"\0" + path.read_bytes())
    digest.update(" ".join(CFLAGS + CUDA_FLAGS).encode())
    key = f"{arch(device)}-torch{torch.__version__}-{digest.hexdigest()[:16]}".replace("+", "_")
    root = os.environ.get("ADAPTUNE_BUILD_DIR") or Path.home() / ".cache" / "adaptune" / "ext"
    return Path(root) / key


@contextlib.contextmanager
def _locked(directory: Path):
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the handle closes
        yield


def _reason(error: BaseException, limit: int = 1500) -> str:
    """The compiler's own words: the first error lines of the ninja output, else the message's tail."""
    text = str(error)
    lines = [line for line in text.splitlines() if "error" in line.lower()]
    short = "\n".join(lines[:8]) if lines else text
    return f"{type(error).__name__}: {short[-limit:]}"


def build_all() -> dict[str, Build]:
    """Build and load one library for this machine: with the CUDA kernels when CUDA is available
    (falling back to a CPU-only build if that fails), else CPU only. One library per process, since
    it defines the `adaptune` op namespace."""
    results: dict[str, Build] = {}
    if torch.cuda.is_available():
        results["cuda"] = build("cuda")
        if results["cuda"].ok:
            return {**results, "cpu": Build("cpu", True, results["cuda"].reason, results["cuda"].path)}
    else:
        results["cuda"] = Build("cuda", False, "CUDA is not available")
    results["cpu"] = build("cpu")
    return results


def build(device: str) -> Build:
    """Compile (or reuse) and load the extension with `device`'s sources ("cpu" or "cuda"); never raises."""
    missing = [str(p) for p in sources(device) if not p.is_file()]
    if missing:
        return Build(device, False, f"sources not found: {', '.join(missing)} (csrc/ ships with a source checkout)")
    if device == "cuda" and not torch.cuda.is_available():
        return Build(device, False, "CUDA is not available")
    try:
        directory = build_dir(device)
        from torch.utils import cpp_extension  # lazy: importing it costs time and is needed only here

        with _locked(directory):
            # torch's own baton: a build killed mid-way (SIGKILL, OOM, a CI timeout) leaves it behind and
            # load() would wait for it forever; holding our lock, no other adaptune build is running here
            (directory / "lock").unlink(missing_ok=True)
            path = cpp_extension.load(
                name=NAME, sources=[str(p) for p in sources(device)], build_directory=str(directory),
                extra_cflags=CFLAGS, extra_cuda_cflags=CUDA_FLAGS, extra_include_paths=[str(CSRC)],
                is_python_module=False, verbose=False)
    except Exception as error:  # noqa: BLE001 — any failure is reported, with its reason, by the caller
        return Build(device, False, _reason(error))
    return Build(device, True, f"built in {directory}", str(path))
