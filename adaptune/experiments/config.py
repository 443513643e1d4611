"""The multitask experiment's settings (ExperimentConfig, with the QUICK and FULL presets) and what a
run loads from them: the base model, its tokenizer, the datasets, the seeds.

Every setting is written once, here and in Method: default and help (field metadata "help"; "flags",
"metavar" and "panel" shape the CLI option). cli/options.py builds `adaptune run multitask`'s options
from these fields."""
from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..models import PRESETS, load_model, minilm_path
from .data import SHARED_DATA, DatasetSplits, default_data_dir, load_dataset
from .datasets import ALIASES, DATASETS, DEFAULT_DATASETS, parse_datasets
from .eda import augment, load_synonyms
from .methods import Method, lr_defaults

QUICK = {"epochs": 1, "train_limit": 512, "dev_limit": 400, "max_length": 64, "batch_size": 16}
FULL = {"epochs": 3, "train_limit": None, "dev_limit": None, "max_length": 128, "batch_size": 32}


def _words(preset: dict) -> str:
    """'--epochs 1, --train-limit 512, ...' (None: all)."""
    return ", ".join(f"--{k.replace('_', '-')} {'all' if v is None else v}" for k, v in preset.items())


def _preset(text: str, key: str) -> dict:
    """Field metadata of a setting that QUICK / FULL fill when it is None."""
    show = lambda v: "all" if v is None else v  # noqa: E731
    return {"help": f"{text} (default {show(FULL[key])}; {show(QUICK[key])} with --quick)", "panel": "Budget"}


@dataclass
class ExperimentConfig:
    """The settings of one multitask run; the field metadata is the help of `adaptune run multitask`'s options
    (fields without help, like `command`, are not options)."""
    method: Method = field(default_factory=Method)
    model: str = field(default="minilm", metadata={
        "help": "minilm (all-MiniLM-L6-v2), a local Hugging Face BERT/GPT-2 directory, or a cached hub name",
        "panel": "Model and data"})
    tokenizer: str | None = field(default=None, metadata={
        "help": "tokenizer directory or hub name (default: the model's)", "panel": "Model and data"})
    tasks: tuple[str, ...] = field(default=DEFAULT_DATASETS, metadata={
        "help": f"datasets, comma-separated, of {', '.join(DATASETS)} (aliases: "
                f"{', '.join(f'{a}={n}' for a, n in ALIASES.items())})", "panel": "Model and data"})
    data_dir: str | None = field(default=None, metadata={
        "help": f"default: $ADAPTUNE_DATA, else {SHARED_DATA}", "metavar": "<dir>", "panel": "Model and data"})
    quick: bool = field(default=False, metadata={
        "help": f"a quick look: {_words(QUICK)} in place of {_words(FULL)}", "flags": ("--quick",),
        "panel": "Budget"})
    epochs: int | None = field(default=None, metadata=_preset("passes over the training data", "epochs"))
    train_limit: int | None = field(default=None, metadata=_preset("train examples per dataset, a seeded subset",
                                                                   "train_limit"))
    dev_limit: int | None = field(default=None, metadata=_preset("dev examples per dataset, a seeded subset",
                                                                 "dev_limit"))
    max_length: int | None = field(default=None, metadata=_preset("tokens per example or pair", "max_length"))
    batch_size: int | None = field(default=None, metadata=_preset("training examples per step", "batch_size"))
    lr: float | None = field(default=None, metadata={
        "help": f"learning rate of the base or components (default: {lr_defaults()})", "panel": "Training"})
    head_lr: float = field(default=3e-3, metadata={"help": "learning rate of the per-dataset heads",
                                                   "panel": "Training"})
    layer_lr_decay: float | None = field(default=None, metadata={
        "help": "layer-wise learning-rate decay xi in (0, 1]: layer l gets lr*xi^(L-1-l) (seed 003)",
        "panel": "Training"})
    split_ratio: float = field(default=0.8, metadata={
        "help": "train share of a dataset without a dev file (quora-dev.csv), split by --data-seed; the rest is dev",
        "panel": "Model and data"})
    augment: str | None = field(default=None, metadata={
        "help": "'eda': random insertion, swap, deletion; synonym replacement with --synonyms (seed 002)",
        "panel": "Training"})
    n_aug: int = field(default=1, metadata={"help": "EDA copies per training example", "panel": "Training"})
    synonyms: str | None = field(default=None, metadata={
        "help": "synonym list for EDA: 'word syn1,syn2' per line", "metavar": "<file>", "panel": "Training"})
    seed: int = field(default=0, metadata={"help": "initialisation, batch order, dropout, EDA", "panel": "Training"})
    data_seed: int = field(default=0, metadata={
        "help": "the train/dev split and the subsets: the same for every method and seed", "panel": "Model and data"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda or cuda:N", "panel": "Run"})
    name: str | None = field(default=None, metadata={"help": "run name (default from method and seed)",
                                                     "panel": "Run"})
    out: str = field(default="runs", metadata={"help": "runs are written to OUT/NAME", "metavar": "<dir>",
                                               "panel": "Run"})
    command: str = ""  # the command line that started the run, recorded in command.txt

    def resolved(self) -> "ExperimentConfig":
        preset = QUICK if self.quick else FULL
        filled = {k: (v if getattr(self, k) is None else getattr(self, k)) for k, v in preset.items()}
        cfg = replace(self, **filled, lr=self.method.default_lr if self.lr is None else self.lr,
                      data_dir=str(self.data_dir or default_data_dir()),
                      tasks=tuple(d.name for d in parse_datasets(list(self.tasks))))
        if cfg.augment not in (None, "eda"):
            raise ConfigError(f"--augment takes 'eda', got {cfg.augment!r}")
        for what in ("epochs", "batch_size", "max_length", "n_aug"):
            if getattr(cfg, what) < 1:
                raise ConfigError(f"{what} must be at least 1, got {getattr(cfg, what)}")
        if cfg.lr <= 0 or cfg.head_lr <= 0:
            raise ConfigError(f"learning rates must be positive, got lr={cfg.lr}, head_lr={cfg.head_lr}")
        if cfg.device not in ("cpu", "cuda") and not cfg.device.startswith("cuda:"):
            raise ConfigError(f"device must be cpu, cuda or cuda:N, got {cfg.device!r}")
        if cfg.device != "cpu" and not torch.cuda.is_available():
            raise ConfigError(f"device {cfg.device!r} asked for, but CUDA is not available here")
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "ExperimentConfig":
        return ExperimentConfig(**{**d, "method": Method(**d["method"]), "tasks": tuple(d["tasks"])})


def load_tokenizer(model_name: str, tokenizer: str | None = None) -> Any:
    """The tokenizer for `model_name`: MiniLM's for 'minilm' and the random bert presets, the model
    directory's own, or a hub name from the local cache."""
    from transformers import AutoTokenizer
    if tokenizer is None:
        if model_name in PRESETS and model_name.startswith("gpt2"):
            raise ConfigError(f"no tokenizer ships with the random preset {model_name!r}: give --tokenizer DIR")
        tokenizer = str(minilm_path()) if model_name in PRESETS else model_name
    try:
        tok = AutoTokenizer.from_pretrained(str(tokenizer))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load a tokenizer from {tokenizer!r} (a local directory, or a hub name in the "
                          f"local cache; downloads are off unless HF_HUB_OFFLINE=0): {e}") from e
    if tok.pad_token is None:  # GPT-2
        tok.pad_token = tok.eos_token
    return tok


def load_base(name: str, seed: int) -> nn.Module:
    """A preset or local directory (adaptune.models.load_model), else a hub name from the local cache."""
    if name in PRESETS or Path(name).is_dir():
        return load_model(name, seed=seed)
    from transformers import AutoModel
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return AutoModel.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise ConfigError(f"unknown model {name!r}: give one of {', '.join(PRESETS)}, a local Hugging Face "
                          f"BERT/GPT-2 directory, or a hub name in the local cache ({e})") from e


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy
        numpy.random.seed(seed)
    except ImportError:  # numpy is optional
        pass


def load_data(cfg: ExperimentConfig) -> dict[str, DatasetSplits]:
    data = {d.name: load_dataset(d, Path(cfg.data_dir), seed=cfg.data_seed, split_ratio=cfg.split_ratio,
                                 train_limit=cfg.train_limit, dev_limit=cfg.dev_limit)
            for d in parse_datasets(list(cfg.tasks))}
    if cfg.augment == "eda":
        table = load_synonyms(cfg.synonyms) if cfg.synonyms else None
        for d in data.values():
            d.train = augment(d.train, cfg.n_aug, cfg.seed, synonyms=table)
            d.info["used"]["train_augmented"] = len(d.train)
    return data
