"""A wheel of adaptune holds one top-level package, adaptune (cli/ as adaptune.cli, csrc/ as adaptune/_csrc),
and its console script points into it; benchmarks/ and tests/ stay in the checkout."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("setup.py", "MANIFEST.in", "README.md", "adaptune", "cli", "csrc", "benchmarks", "tests")


def test_the_wheel_installs_only_adaptune(tmp_path):
    src = tmp_path / "src"  # a clean copy: no build/ left over from earlier builds in the checkout
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "results"))
        else:
            shutil.copy2(ROOT / name, src)
    build = f"import setuptools.build_meta as backend; backend.build_wheel({str(tmp_path)!r})"  # no pip needed
    subprocess.run([sys.executable, "-c", build], check=True, capture_output=True, cwd=src)
    (wheel,) = tmp_path.glob("adaptune-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"adaptune"}, sorted(tops)
    assert "adaptune/cli/app.py" in names and "adaptune/_csrc/schema.cpp" in names
    (entry,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "adaptune = adaptune.cli.app:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_the_exports_resolve_on_first_use():
    """`import adaptune` imports no torch; every name of __all__ resolves (and is in dir()) when first used, and
    `attach` stays the function when the module adaptune.attach was imported first."""
    code = """
import sys, types
import adaptune
assert "torch" not in sys.modules, "import adaptune imported torch"
import adaptune.save_load  # imports the module adaptune.attach
from adaptune import attach, LoRA, DataError
assert callable(attach) and not isinstance(attach, types.ModuleType) and adaptune.attach is attach
assert set(adaptune.__all__) <= set(dir(adaptune))
assert all(getattr(adaptune, name) is not None for name in adaptune.__all__)
assert issubclass(DataError, adaptune.AdaptuneError) and LoRA(4).r == 4
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
