"""The kernel build and dispatch: modes, failed builds, build directory, the build manifest (a damaged
cached library is rebuilt, never loaded), and an nvcc compile check of every .cu (the CUDA kernels are
compile-checked here, not run: CI has no GPU)."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from adaptune import AdaptuneError, ops
from adaptune.errors import ConfigError
from adaptune.ops import build, reference

NVCC = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"


def test_use_kernels_sets_the_mode_and_restores_it_as_a_context_manager():
    before = ops.mode()
    with ops.use_kernels("off"):
        assert ops.mode() == "off"
        assert ops.path("lora", "cpu") == ("reference", "kernels off (ADAPTUNE_KERNELS=off or use_kernels('off'))")
    assert ops.mode() == before
    with pytest.raises(ConfigError, match="valid: auto, off, require"):
        ops.use_kernels("sometimes")


@pytest.fixture
def failed_build(monkeypatch):
    """Pretend the one build attempt failed with a compiler error."""
    failed = {d: build.Build(d, False, "RuntimeError: dora.cpp:3: error: expected ';'") for d in ("cpu", "cuda")}
    monkeypatch.setattr(ops, "_builds", failed)
    monkeypatch.setattr(ops, "_warned", set())


def test_auto_mode_warns_once_with_the_reason_and_runs_the_reference(failed_build):
    g = torch.Generator().manual_seed(0)
    x, W, A, B = (torch.randn(*s, generator=g) for s in [(2, 4), (3, 4), (2, 4), (3, 2)])
    with ops.use_kernels("auto"), pytest.warns(RuntimeWarning, match="expected ';'") as caught:
        y = ops.lora(x, W, None, A, B, 2.0)
        ops.lora(x, W, None, A, B, 2.0)
    assert len([w for w in caught if "adaptune" in str(w.message)]) == 1
    torch.testing.assert_close(y, reference.lora(x, W, None, A, B, 2.0))
    assert ops.path("dora", "cpu")[0] == "reference" and "expected ';'" in ops.path("dora", "cpu")[1]


def test_require_mode_raises_with_the_reason(failed_build):
    x = torch.randn(2, 4)
    with ops.use_kernels("require"), pytest.raises(AdaptuneError, match="not available on cpu: .*expected ';'"):
        ops.bottleneck(x, x, torch.randn(2, 4), None, torch.randn(4, 2), None)


@pytest.fixture
def broken_sources(tmp_path, monkeypatch):
    """A csrc/ whose schema file does not compile, and a build root under tmp_path/ext."""
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cuda").mkdir()
    (tmp_path / "schema.cpp").write_text("#error adaptune test: broken on purpose\n")
    for op in build.FAMILIES:
        (tmp_path / "cpu" / f"{op}.cpp").write_text(f"int {op};\n")
    monkeypatch.setattr(build, "CSRC", tmp_path)
    monkeypatch.setenv("ADAPTUNE_BUILD_DIR", str(tmp_path / "ext"))
    return tmp_path


def test_a_broken_source_gives_the_compiler_reason(broken_sources, tmp_path):
    result = build.build("cpu")
    assert not result.ok and "broken on purpose" in result.reason
    assert build.build_dir("cpu").parent == tmp_path / "ext"


def test_a_stale_torch_build_lock_does_not_hang_the_next_build(broken_sources):
    """A build killed mid-way leaves torch's `lock` file; the next build must go on, not wait forever."""
    import threading

    directory = build.build_dir("cpu")
    directory.mkdir(parents=True)
    (directory / "lock").write_text("")  # left behind by a killed build
    results = []
    worker = threading.Thread(target=lambda: results.append(build.build("cpu")), daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "build() still waiting on the stale lock after 120 s"
    assert not results[0].ok and "broken on purpose" in results[0].reason


def test_build_dir_is_keyed_on_sources_torch_and_arch(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTUNE_BUILD_DIR", str(tmp_path))
    key = build.build_dir("cpu").name
    assert build.arch("cpu") in key and torch.__version__.replace("+", "_") in key
    monkeypatch.setattr(build, "CFLAGS", ["-O2"])
    assert build.build_dir("cpu").name != key


def test_prune_removes_older_builds_nobody_is_using(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTUNE_BUILD_DIR", str(tmp_path))
    current = build.build_dir("cpu")
    prefix = current.name[: -16]
    old, busy, other = (tmp_path / (prefix + "0" * 16), tmp_path / (prefix + "1" * 16), tmp_path / "cuda-sm90-x")
    for d in (current, old, busy, other):
        (d / "sub").mkdir(parents=True)
    with build._locked(busy) as got:  # a build in progress in `busy`
        assert got
        removed = build.prune("cpu", keep=current)
    assert removed == [old] and not old.exists()
    assert current.is_dir() and busy.is_dir() and other.is_dir()


def test_two_torch_installs_of_one_version_keep_a_build_each(tmp_path, monkeypatch):
    """Two virtual environments with the same torch version link against different installs: each gets
    its own key (else each rebuilds over the other's), and pruning one's older builds leaves the other's."""
    monkeypatch.setenv("ADAPTUNE_BUILD_DIR", str(tmp_path / "ext"))
    built = {}
    for env in ("a", "b"):
        monkeypatch.setattr(torch, "__file__", str(tmp_path / env / "site-packages" / "torch" / "__init__.py"))
        built[env] = build.build_dir("cpu")
    assert built["a"].name[:-16] != built["b"].name[:-16]  # the same sources, another environment
    assert f"py{sys.version_info[0]}{sys.version_info[1]}" in built["a"].name
    older_b = built["b"].with_name(built["b"].name[:-16] + "0" * 16)
    for d in (*built.values(), older_b):
        (d / "sub").mkdir(parents=True)
    assert build.prune("cpu", keep=built["b"]) == [older_b]  # environment b is the current one
    monkeypatch.setattr(torch, "__file__", str(tmp_path / "a" / "site-packages" / "torch" / "__init__.py"))
    assert build.prune("cpu", keep=built["a"]) == []
    assert built["a"].is_dir() and built["b"].is_dir() and not older_b.exists()
    assert build.torch_lib() == tmp_path / "a" / "site-packages" / "torch" / "lib"


def test_importing_adaptune_builds_and_loads_nothing_and_kernels_needs_the_library():
    """`adaptune.ops.kernels` registers fakes and autograd at import: it is imported only after the build."""
    code = (
        "import sys, torch, adaptune, adaptune.ops\n"
        "assert not {'adaptune.ops.build', 'adaptune.ops.kernels', 'torch.utils.cpp_extension'} & set(sys.modules)\n"
        "assert not hasattr(torch.ops.adaptune, 'lora')\n"
        "try:\n"
        "    import adaptune.ops.kernels\n"
        "except ImportError as error:\n"
        "    assert 'adaptune.ops.builds()' in str(error), error\n"
        "else:\n"
        "    raise AssertionError('adaptune.ops.kernels imported without the library')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_trainable_base_weight_runs_the_reference_with_a_warning(monkeypatch):
    monkeypatch.setattr(ops, "_warned", set())
    x, W, A, B = torch.randn(2, 4), torch.randn(3, 4, requires_grad=True), torch.randn(2, 4), torch.randn(3, 2)
    with pytest.warns(RuntimeWarning, match="trainable base"):
        ops.lora(x, W, None, A, B, 1.0).sum().backward()
    torch.testing.assert_close(W.grad, torch.ones(2, 3).T @ x)  # d(sum(x Wᵀ + x Aᵀ Bᵀ))/dW


def _cuda_include_stub(tmp_path: Path) -> Path:
    """torch's CPU wheel lacks c10/cuda/impl/cuda_cmake_macros.h (generated by CUDA builds)."""
    stub = tmp_path / "include"
    (stub / "c10" / "cuda" / "impl").mkdir(parents=True)
    (stub / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text("#pragma once\n")
    return stub


@pytest.mark.skipif(not NVCC.exists() and shutil.which("nvcc") is None,
                    reason=f"nvcc not found at {NVCC} or on PATH: the CUDA sources are not compile-checked")
def test_every_cuda_source_compiles_with_nvcc(tmp_path):
    from torch.utils.cpp_extension import include_paths

    nvcc = str(NVCC) if NVCC.exists() else shutil.which("nvcc")
    flags = ["-c", "-o", os.devnull, "-std=c++20", "-arch=sm_90", "--expt-relaxed-constexpr",
             "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
             "-D__CUDA_NO_HALF2_OPERATORS__", f"-I{_cuda_include_stub(tmp_path)}", f"-I{build.CSRC}",
             f"-I{sysconfig.get_paths()['include']}"] + [f"-I{p}" for p in include_paths()]
    sources = build.sources("cuda")
    cu = [s for s in sources if s.suffix == ".cu"]
    assert {s.name for s in cu} == {"lora.cu", "dora.cu", "bottleneck.cu", "routed.cu"}
    # one translation unit including every .cu: torch's headers are parsed once (errors name the real files)
    umbrella = tmp_path / "all.cu"
    umbrella.write_text("".join(f'#include "{s}"\n' for s in cu))
    proc = subprocess.run([nvcc, *flags, str(umbrella)], capture_output=True, text=True)
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "error" in line]
    assert proc.returncode == 0, "nvcc failed:\n" + "\n".join(errors or [proc.stderr[-3000:]])


# --- the build manifest: a cached library is loaded only if it matches what its build recorded ---

_RUN_OP = """
import json, warnings, torch
from adaptune import ops
from adaptune.ops import reference
g = torch.Generator().manual_seed(0)
x, W, b, A, B = (torch.randn(*s, generator=g) for s in [(5, 8), (6, 8), (6,), (3, 8), (6, 3)])
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    y = ops.lora(x, W, b, A, B, 2.0)
torch.testing.assert_close(y, reference.lora(x, W, b, A, B, 2.0), rtol=1e-5, atol=1e-5)
built = ops.builds()["cpu"]
print(json.dumps({"path": ops.path("lora", "cpu"), "library": built.path, "reason": built.reason,
                  "warnings": [str(w.message) for w in caught if "adaptune" in str(w.message)]}))
"""


def _run_op(root: Path, mode: str = "auto") -> dict:
    """Run one lora op (checked against the reference) in a fresh process building into `root`."""
    env = {**os.environ, "ADAPTUNE_BUILD_DIR": str(root), "ADAPTUNE_KERNELS": mode,
           "CUDA_VISIBLE_DEVICES": ""}  # the CPU build: the manifest does not depend on the device
    proc = subprocess.run([sys.executable, "-c", _RUN_OP], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, f"exit status {proc.returncode}:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _matches_manifest(library: Path) -> bool:
    recorded = build.read_manifest(library.parent)
    digest = hashlib.sha256(library.read_bytes()).hexdigest()
    return recorded is not None and recorded.get(library.name) == {"size": library.stat().st_size, "sha256": digest}


@pytest.fixture(scope="module")
def built_root(tmp_path_factory):
    """One real CPU build, in its own build root; tests copy it (mtimes kept, so ninja sees it up to date)."""
    root = tmp_path_factory.mktemp("ext")
    result = _run_op(root)
    assert result["path"][0] == "kernel", result
    return root


@pytest.fixture
def cache(built_root, tmp_path):
    """(build root, library) of a private copy of the one real build."""
    root = tmp_path / "ext"
    shutil.copytree(built_root, root)
    (library,) = root.glob(f"*/{build.NAME}.so")
    return root, library


def test_a_build_records_its_outputs_and_an_intact_cache_is_loaded_as_is(cache):
    root, library = cache
    assert _matches_manifest(library)
    recorded = build.read_manifest(library.parent)
    assert {"schema.o", "lora.o", "dora.o", "bottleneck.o"} <= set(recorded)
    before = library.stat().st_mtime_ns
    result = _run_op(root)
    assert result["path"][0] == "kernel" and "rebuilt" not in result["reason"] and not result["warnings"]
    assert library.stat().st_mtime_ns == before


def test_a_truncated_library_is_rebuilt_not_loaded(cache):
    """Loading a truncated .so dies of SIGBUS: it is relinked (the object files are sound) instead."""
    root, library = cache
    size = library.stat().st_size
    with open(library, "r+b") as handle:
        handle.truncate(size // 2)
    result = _run_op(root)
    assert result["path"][0] == "kernel" and not result["warnings"], result
    assert f"{size // 2} bytes, {size} recorded" in result["reason"]
    assert Path(result["library"]) == library and library.stat().st_size == size and _matches_manifest(library)


def test_a_damaged_object_file_is_recompiled_with_the_library(cache):
    root, library = cache
    for path in (library, library.parent / "lora.o"):
        with open(path, "r+b") as handle:
            handle.truncate(1000)
    result = _run_op(root)
    assert result["path"][0] == "kernel" and "lora.o: 1000 bytes" in result["reason"], result
    assert _matches_manifest(library)
    assert build.read_manifest(library.parent)["lora.o"]["size"] == (library.parent / "lora.o").stat().st_size


def test_a_library_without_a_manifest_is_rebuilt_from_scratch_not_loaded(cache):
    """No manifest: nothing in the directory can be verified (here the .so is truncated too: loading it
    would kill the process)."""
    root, library = cache
    (library.parent / build.MANIFEST).unlink()
    with open(library, "r+b") as handle:
        handle.truncate(library.stat().st_size // 2)
    result = _run_op(root)
    assert result["path"][0] == "kernel" and f"no valid {build.MANIFEST}" in result["reason"], result
    assert _matches_manifest(library)


def test_a_failed_rebuild_of_an_unverified_library_says_why_and_loads_nothing(broken_sources, monkeypatch):
    """The garbage library is removed, never loaded; auto mode then warns once, require mode raises."""
    directory = build.build_dir("cpu")
    directory.mkdir(parents=True)
    (directory / f"{build.NAME}.so").write_bytes(b"\x7fELF truncated")
    result = build.build("cpu")
    assert not result.ok and "broken on purpose" in result.reason
    assert f"(rebuilding: {build.NAME}.so had no valid {build.MANIFEST})" in result.reason
    assert not (directory / f"{build.NAME}.so").exists()
    monkeypatch.setattr(ops, "_builds", {"cpu": result, "cuda": build.Build("cuda", False, "no CUDA")})
    monkeypatch.setattr(ops, "_warned", set())
    x = torch.randn(2, 4)
    with ops.use_kernels("require"), pytest.raises(AdaptuneError, match="(?s)not available on cpu: .*no valid manifest"):
        ops.lora(x, torch.randn(3, 4), None, torch.randn(2, 4), torch.randn(3, 2), 1.0)
    with ops.use_kernels("auto"), pytest.warns(RuntimeWarning, match="broken on purpose"):
        ops.lora(x, torch.randn(3, 4), None, torch.randn(2, 4), torch.randn(3, 2), 1.0)
