"""The multitask experiment's settings (ExperimentConfig, with the QUICK and FULL presets) and the data a
run loads from them (load_data); the bases, tokenizers and seeds come from common/.

Every setting is written once, here and in Method: default and help (field metadata "help"; "flags",
"metavar" and "panel" shape the CLI option). cli/options.py builds `adaptune run multitask`'s options
from these fields. Every setting is checked when the config is made (__post_init__), so the Python API and
the CLI refuse the same values (a NaN learning rate, a run name with a path in it) before anything runs."""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ...errors import ConfigError
from ..common.config import DEVICE, check_device, check_run_name
from ..common.data import SHARED_DATA, DatasetSplits, default_data_dir, load_dataset
from ..common.datasets import ALIASES, DATASETS, DEFAULT_DATASETS, parse_datasets
from ..common.methods import RENAMED, Method, lr_defaults, method_fields
from ..common.quantize import COMPONENTS, check_quantize, option, refuse_base_training
from .eda import augment, load_synonyms

BATCHING = ("round-robin", "mixed")
COMPONENT_METHODS = (f"--method lora, dora, adapter, lora+adapter, hyper, prefix, prompt, head-only or --spec "
                     f"({COMPONENTS}; the heads stay float)")
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
    quantize: str | None = field(default=None, metadata=option("Model and data"))
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
    batching: str = field(default="round-robin", metadata={
        "help": "round-robin: each batch from one dataset, the datasets taking turns; mixed: every batch mixes "
                "them, each sample through its dataset's components (adaptation.route), head and loss, the "
                "datasets' mean losses weighted by their share of the batch; dev sets evaluated in mixed batches too",
        "metavar": "round-robin|mixed", "panel": "Training"})
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
    name: str | None = field(default=None, metadata={
        "help": "run name, a plain directory name (default: method, seed and a hash of the settings)",
        "panel": "Run"})
    out: str = field(default="runs", metadata={"help": "runs are written to OUT/NAME", "metavar": "<dir>",
                                               "panel": "Run"})
    overwrite: bool = field(default=False, metadata={
        "help": "replace a run saved under the same OUT/NAME (once the new run is complete); without it the run "
                "is refused before training", "flags": ("--overwrite",), "panel": "Run"})
    fsdp: bool = field(default=False, metadata={
        "help": "under torchrun: shard the frozen base and the components across the ranks with FSDP2 "
                "(fully_shard on each layer and the model), the heads replicated", "flags": ("--fsdp",),
        "panel": "Run"})
    command: str = ""  # the command line that started the run, recorded in command.txt

    def __post_init__(self) -> None:
        for what in ("lr", "head_lr"):
            _check(self, what, "a positive finite number", lambda v: _real(v) and v > 0, optional=what == "lr")
        _check(self, "layer_lr_decay", "a number in (0, 1]", lambda v: _real(v) and 0 < v <= 1, optional=True)
        _check(self, "split_ratio", "a number in (0, 1)", lambda v: _real(v) and 0 < v < 1)
        for what in ("epochs", "train_limit", "dev_limit", "max_length", "batch_size", "n_aug"):
            _check(self, what, "an integer of at least 1", lambda v: _integer(v) and v >= 1, optional=what != "n_aug")
        for what in ("seed", "data_seed"):
            _check(self, what, "an integer", _integer)
        for what in ("quick", "overwrite", "fsdp"):
            _check(self, what, "True or False", lambda v: isinstance(v, bool))
        _check(self, "augment", "'eda'", lambda v: v == "eda", optional=True)
        _check(self, "batching", "'round-robin' or 'mixed'", lambda v: v in BATCHING)
        _check(self, "device", "cpu, cuda or cuda:N", lambda v: isinstance(v, str) and bool(DEVICE.fullmatch(v)))
        _check(self, "model", "a model name or directory", lambda v: isinstance(v, str) and bool(v.strip()))
        _check(self, "out", "a directory path", lambda v: isinstance(v, (str, os.PathLike)) and bool(str(v).strip()))
        if self.name is not None:
            check_run_name(self.name)
        check_quantize(self.quantize)
        if self.method.name == "full":
            refuse_base_training(self.quantize, "--method full", COMPONENT_METHODS)
        if self.fsdp and (self.method.name == "full" or self.quantize is not None):
            what = "--method full (the whole base trains)" if self.method.name == "full" else \
                f"--quantize {self.quantize} (fully_shard does not shard quantized layers)"
            raise ConfigError(f"--fsdp shards a float frozen base under the components; {what} is not supported "
                              f"with it: train components on a float base, or drop --fsdp")

    def run_dir(self) -> Path:
        """OUT/NAME, NAME defaulting to default_name (of the resolved settings: call on cfg.resolved())."""
        return Path(self.out) / (self.name or default_name(self))

    def resolved(self) -> "ExperimentConfig":
        preset = QUICK if self.quick else FULL
        filled = {k: (v if getattr(self, k) is None else getattr(self, k)) for k, v in preset.items()}
        cfg = replace(self, **filled, lr=self.method.default_lr if self.lr is None else self.lr,
                      data_dir=str(self.data_dir or default_data_dir()),
                      tasks=tuple(d.name for d in parse_datasets(list(self.tasks))))
        check_device(cfg.device)
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "ExperimentConfig":
        """The config of a results.json (of runs saved before --stack became --spec too)."""
        return ExperimentConfig(**{**d, "method": Method(**method_fields(d["method"])), "tasks": tuple(d["tasks"])})


NOT_HASHED = ("name", "out", "overwrite", "command", "fsdp")  # where and how a run goes, not what it computes
ADDED = ("quantize",)  # settings added since names were first hashed: hashed only when set, so earlier names stay


def _real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check(cfg: ExperimentConfig, what: str, rule: str, ok: Any, optional: bool = False) -> None:
    value = getattr(cfg, what)
    if not (optional and value is None) and not ok(value):
        raise ConfigError(f"{what} (--{what.replace('_', '-')}) must be {rule}, got {value!r}")


def default_name(cfg: ExperimentConfig) -> str:
    """'<method label>-seed<seed>-<hash>': the hash (8 hex digits) of every setting but NOT_HASHED, so runs that
    differ in any setting (--lr, --epochs, the data) get different names."""
    label = re.sub(r"[^A-Za-z0-9.+]+", "-", cfg.method.label().replace("=", "")).strip("-")
    settings = {k: v for k, v in cfg.to_dict().items() if k not in NOT_HASHED and not (k in ADDED and v is None)}
    former = {new: old for old, new in RENAMED.items()}  # Method.spec hashed as `stack`, its name before the rename,
    settings["method"] = {former.get(k, k): v for k, v in settings["method"].items()}  # so default names stay
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{label}-seed{cfg.seed}-{digest}"


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
