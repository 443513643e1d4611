"""The kernel build and dispatch: modes, failed builds, build directory, and an nvcc compile check of
every .cu (the CUDA kernels are compile-checked here, not run: CI has no GPU)."""
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
    assert W.grad is not None


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
    assert {s.name for s in cu} == {"lora.cu", "dora.cu", "bottleneck.cu"}
    # one translation unit including every .cu: torch's headers are parsed once (errors name the real files)
    umbrella = tmp_path / "all.cu"
    umbrella.write_text("".join(f'#include "{s}"\n' for s in cu))
    proc = subprocess.run([nvcc, *flags, str(umbrella)], capture_output=True, text=True)
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "error" in line]
    assert proc.returncode == 0, "nvcc failed:\n" + "\n".join(errors or [proc.stderr[-3000:]])
