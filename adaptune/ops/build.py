"""Builds and loads the C++/CUDA extension (csrc/) once per process, with torch's JIT loader and ninja.

The build directory is keyed on the sources' hash, the device architecture, the torch version, the Python
version and the torch install the library links against (a short hash of torch's lib directory):
`$ADAPTUNE_BUILD_DIR/<key>` (default `~/.cache/adaptune/ext/<key>`), so a cached build is reused across
processes and sessions, and two environments with the same torch version keep a build each (ninja rebuilds
whenever the include and library paths on its command line change). After a successful build, older builds
of the same environment (the same key prefix) are removed. A file lock keeps two processes from building
into the same directory at once. `torch.utils.cpp_extension` is imported only when a build is attempted.
The sources are csrc/ of a source checkout, or the copy a regular install ships inside the package
(adaptune/_csrc).

A successful build records `manifest.json` beside its outputs: the build key, the torch version and
{file: size, SHA-256} for the library and every object file. A cached library is loaded only if it
matches its manifest (mapping a truncated .so kills the process with SIGBUS); otherwise the outputs
that do not match are removed, so ninja rebuilds them (all outputs, when the manifest is missing).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..files import atomic_write

_CHECKOUT = Path(__file__).resolve().parents[2] / "csrc"
CSRC = _CHECKOUT if _CHECKOUT.is_dir() else Path(__file__).resolve().parents[1] / "_csrc"
NAME = "adaptune_ops"
FAMILIES = ("lora", "dora", "bottleneck", "routed")  # one source file per op family and device: cpu/<op>.cpp, cuda/<op>.cu
CFLAGS = ["-O3"]
CUDA_FLAGS = ["-O3", "--expt-relaxed-constexpr"]
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Build:
    """The outcome of one build attempt for one device type: a loaded library, or the reason it is not."""
    device: str
    ok: bool
    reason: str
    path: str | None = None


def sources(device: str) -> list[Path]:
    """Translation units for a device type: the schemas and CPU kernels always, the .cu files for CUDA."""
    files = [CSRC / "schema.cpp", *(CSRC / "cpu" / f"{op}.cpp" for op in FAMILIES)]
    return files + [CSRC / "cuda" / f"{op}.cu" for op in FAMILIES] if device == "cuda" else files


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
    return _root() / f"{_prefix(device)}{digest.hexdigest()[:16]}"


def _root() -> Path:
    return Path(os.environ.get("ADAPTUNE_BUILD_DIR") or Path.home() / ".cache" / "adaptune" / "ext")


def torch_lib() -> Path:
    """The lib directory of the torch install this process runs (what the extension links against)."""
    return Path(torch.__file__).resolve().parent / "lib"


def _prefix(device: str) -> str:
    """What a build of this environment is keyed on besides the sources: architecture, torch version,
    Python version, and a short hash of the torch install's lib directory."""
    env = hashlib.sha256(str(torch_lib()).encode()).hexdigest()[:8]
    python = f"py{sys.version_info[0]}{sys.version_info[1]}"
    return f"{arch(device)}-torch{torch.__version__}-{python}-{env}-".replace("+", "_")


@contextlib.contextmanager
def _locked(directory: Path, wait: bool = True):
    """Holds `directory`'s lock file (yields False without waiting when `wait` is off and it is taken)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a+") as handle:  # the lock is released when the handle closes
        try:
            if os.name == "nt":
                import msvcrt
                handle.seek(0)
                msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK if wait else msvcrt.LK_NBLCK, 1)
            else:
                import fcntl
                fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError:
            if wait:
                raise
            yield False
            return
        yield True


def prune(device: str, keep: Path) -> list[Path]:
    """Removes the other builds of this environment (same key prefix: architecture, torch version and
    install, Python; older sources) that no process is building into; returns what was removed."""
    removed = []
    for other in _root().glob(_prefix(device) + "*"):
        if other == keep or not other.is_dir():
            continue
        with _locked(other, wait=False) as free:
            if free:
                shutil.rmtree(other, ignore_errors=True)
                removed.append(other)
    return removed


def _digest(path: Path) -> dict:
    """{"size": bytes, "sha256": hex digest} of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def _outputs(directory: Path, lib_ext: str) -> tuple[list[Path], list[Path]]:
    """(libraries, object files) ninja has left in `directory`."""
    files = sorted(p for p in directory.iterdir() if p.is_file())
    return ([p for p in files if p.name.startswith(NAME) and p.name.endswith(lib_ext)],
            [p for p in files if p.suffix == ".o"])


def read_manifest(directory: Path) -> dict | None:
    """{file name: {"size", "sha256"}} recorded for `directory`'s build; None if missing, unreadable or
    written for another key or torch version."""
    try:
        data = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if (not isinstance(data, dict) or data.get("key") != directory.name or data.get("torch") != torch.__version__
            or not isinstance(data.get("files"), dict)):
        return None
    return data["files"]


def write_manifest(directory: Path, lib_ext: str) -> None:
    """Record every library and object file in `directory` (atomically: a reader sees all of it or none)."""
    libraries, objects = _outputs(directory, lib_ext)
    files = {p.name: _digest(p) for p in libraries + objects}
    text = json.dumps({"key": directory.name, "torch": torch.__version__, "files": files}, indent=1)
    atomic_write(directory / MANIFEST, lambda tmp: tmp.write_text(text))


def _clear(directory: Path) -> None:
    """Remove everything in `directory` but the held lock file."""
    for entry in directory.iterdir():
        if entry.name == ".lock":
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def discard_unverified(directory: Path, lib_ext: str) -> tuple[str | None, dict[str, tuple]]:
    """Remove the cached outputs the manifest does not vouch for, so that ninja rebuilds them and no
    unverified library is ever loaded. Returns (what was wrong or None, {verified library: its stat key}).
    Only the libraries are hashed when they match; the object files only when one does not."""
    libraries, objects = _outputs(directory, lib_ext)
    recorded = read_manifest(directory)
    if recorded is None:
        if not libraries:
            return None, {}  # nothing was loadable: ninja finishes (or starts) the build
        _clear(directory)  # the object files cannot be verified either: build from scratch
        return f"{', '.join(p.name for p in libraries)} had no valid {MANIFEST}", {}
    verified, bad = {}, []
    for library in libraries:
        stat = library.stat()
        if _digest(library) == recorded.get(library.name):
            verified[library.name] = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        else:
            bad.append(library)
    if not bad and libraries:
        return None, verified
    bad += [p for p in objects if _digest(p) != recorded.get(p.name)]
    found = [_mismatch(p, recorded.get(p.name)) for p in bad]
    for path in bad:
        path.unlink()
    return (f"{'; '.join(found)} (did not match {MANIFEST})" if found else None), verified


def _mismatch(path: Path, entry: dict | None) -> str:
    size = path.stat().st_size
    if not isinstance(entry, dict):
        return f"{path.name}: {size} bytes, not recorded"
    if size != entry.get("size"):
        return f"{path.name}: {size} bytes, {entry.get('size')} recorded"
    return f"{path.name}: {size} bytes as recorded, another SHA-256"


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

        lib_ext = getattr(cpp_extension, "LIB_EXT", ".so")
        problem = None
        with _locked(directory):
            # torch's own baton: a build killed mid-way (SIGKILL, OOM, a CI timeout) leaves it behind and
            # load() would wait for it forever; holding our lock, no other adaptune build is running here
            (directory / "lock").unlink(missing_ok=True)
            problem, verified = discard_unverified(directory, lib_ext)
            path = Path(cpp_extension.load(
                name=NAME, sources=[str(p) for p in sources(device)], build_directory=str(directory),
                extra_cflags=CFLAGS, extra_cuda_cflags=CUDA_FLAGS, extra_include_paths=[str(CSRC)],
                is_python_module=False, verbose=False))
            stat, note = path.stat(), f", rebuilt: {problem}" if problem else ""
            if verified.get(path.name) != (stat.st_ino, stat.st_size, stat.st_mtime_ns):  # ninja (re)built it
                try:
                    write_manifest(directory, lib_ext)
                except OSError as error:  # loaded all the same; the next process rebuilds
                    note += f"; {MANIFEST} not written: {error}"
    except Exception as error:  # noqa: BLE001 — any failure is reported, with its reason, by the caller
        return Build(device, False, _reason(error) + (f" (rebuilding: {problem})" if problem else ""))
    prune(device, keep=directory)
    return Build(device, True, f"built in {directory}{note}", str(path))
