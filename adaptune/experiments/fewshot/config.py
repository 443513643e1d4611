"""The settings of `adaptune run fewshot` (FewShotConfig) and `adaptune tapt` (TaptConfig), checked when made.

The field metadata is the CLI's help (cli/options.py turns the fields into options), so the Python API and the
CLI refuse the same values; importing this module imports no torch."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ...errors import ConfigError
from ..common.config import check_device_name, check_run_name
from ..common.datasets import REGRESSION, get_dataset
from ..common.methods import METHODS, Method
from ..common.quantize import COMPONENTS, check_quantize, option, refuse_base_training
from .bases import NAMES

MODES = ("zero-shot", "prompt", "head")
QUICK = {"steps": 8, "test_limit": 64, "eval_every": 4}
FULL = {"steps": 100, "test_limit": None, "eval_every": 25}
_SEEDS = re.compile(r"\d+")
COMPONENT_METHODS = (f"--method lora, dora, adapter, lora+adapter, hyper, prefix, prompt or --spec ({COMPONENTS}), "
                     f"or head-only with --mode head")
QUANTIZABLE = "smollm2-135m, tiny-llama, tiny-bert-mlm, minilm, bert-tiny"  # bases whose projections are nn.Linear


def _budget(text: str, key: str) -> dict:
    show = lambda v: "all" if v is None else v  # noqa: E731
    return {"help": f"{text} (default {show(FULL[key])}; {show(QUICK[key])} with --quick)", "panel": "Budget"}


@dataclass(frozen=True)
class FewShotMethod(Method):
    """Method with LoRA as the few-shot default (the multitask runner's default is lora+adapter)."""
    name: str | None = field(default=None, metadata={
        "help": f"one of {', '.join(METHODS)} (default lora; spec when --spec is given)", "flags": ("--method",)})
    r: int = field(default=8, metadata={"help": "LoRA/DoRA rank (lora, dora, lora+adapter)"})

    default: ClassVar[str] = "lora"


def _base_help() -> str:
    return f"{', '.join(NAMES)}, or a local model directory (causal LM, masked LM, or encoder)"


@dataclass(frozen=True)
class FewShotConfig:
    """One few-shot experiment: a dataset, a base, a mode (zero-shot / prompt-based / head fine-tuning), the
    components (`method`), the recipes (self-ensemble, self-distillation, TAPT components), run over `seeds`."""
    method: Method = field(default_factory=FewShotMethod)
    dataset: str = field(default="sst-binary", metadata={
        "help": "a classification dataset of the registry (sst-binary, cfimdb, sst, para, ...)", "panel": "Task"})
    model: str = field(default="smollm2-135m", metadata={"help": _base_help(), "panel": "Task"})
    quantize: str | None = field(default=None, metadata=option("Task"))
    mode: str = field(default="prompt", metadata={
        "help": "zero-shot: the prompt's label words scored, nothing trained; prompt: prompt-based fine-tuning "
                "(cross entropy over the label words' logits); head: a new linear head on the mean-pooled "
                "hidden states", "metavar": "zero-shot|prompt|head", "panel": "Task"})
    template: str | None = field(default=None, metadata={
        "help": "e.g. '<s1> It was [MASK] .' (<s1>, <s2>: the sentences; [MASK]: the answer); default: the "
                "dataset's built-in one", "panel": "Task"})
    verbalizer: str | None = field(default=None, metadata={
        "help": "label words in label order, e.g. 'terrible,great'; '|' gives a label several words "
                "('bad|awful,good|great'); default: the dataset's built-in one", "panel": "Task"})
    data_dir: str | None = field(default=None, metadata={
        "help": "default: $ADAPTUNE_DATA, else ../shared/data/cs224n", "metavar": "<dir>", "panel": "Task"})
    k: int = field(default=16, metadata={"help": "training examples per class (and as many per class for the "
                                                 "few-shot dev set), sampled per seed", "panel": "Few-shot"})
    seeds: tuple[str, ...] = field(default=("0", "1", "2", "3", "4"), metadata={
        "help": "seeds, comma-separated: each samples its own training and dev sets and trains once",
        "panel": "Few-shot"})
    quick: bool = field(default=False, metadata={
        "help": "a quick look: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()),
        "flags": ("--quick",), "panel": "Budget"})
    steps: int | None = field(default=None, metadata=_budget("training steps per seed", "steps"))
    eval_every: int | None = field(default=None, metadata=_budget(
        "steps between few-shot dev evaluations; the best dev checkpoint is tested (0: the last step)",
        "eval_every"))
    test_limit: int | None = field(default=None, metadata=_budget(
        "test examples (the dataset's dev file), one seeded subset for every seed", "test_limit"))
    batch_size: int = field(default=8, metadata={"help": "training examples per step", "panel": "Budget"})
    max_length: int = field(default=128, metadata={"help": "tokens per example, template included (the "
                                                           "sentences are truncated, never the template)",
                                                   "panel": "Budget"})
    lr: float | None = field(default=None, metadata={"help": "learning rate of the components or base (default: "
                                                             "the method's)", "panel": "Training"})
    head_lr: float = field(default=3e-3, metadata={"help": "learning rate of the head (mode head)",
                                                   "panel": "Training"})
    self_ensemble: int | None = field(default=None, metadata={
        "help": "T: also test the average of the trainable parameters over the last T snapshots (Xu et al. "
                "2020's self-ensemble)", "metavar": "T", "panel": "Recipes"})
    ensemble_every: int = field(default=1, metadata={
        "help": "optimizer steps between self-ensemble snapshots (1: the last T steps)", "panel": "Recipes"})
    self_distill: float | None = field(default=None, metadata={
        "help": "lambda: train on CE + lambda * MSE(logits, the self-ensemble's logits) (needs --self-ensemble)",
        "metavar": "LAMBDA", "panel": "Recipes"})
    init_from: str | None = field(default=None, metadata={
        "help": "start from the components of an `adaptune tapt` output directory (task-adaptive pretraining)",
        "metavar": "<dir>", "panel": "Recipes"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda or cuda:N", "panel": "Run"})
    name: str | None = field(default=None, metadata={"help": "run name (default: from the settings)",
                                                     "panel": "Run"})
    out: str = field(default="runs", metadata={"help": "runs are written to OUT/NAME", "metavar": "<dir>",
                                               "panel": "Run"})
    overwrite: bool = field(default=False, metadata={"help": "replace a run saved under the same name",
                                                     "flags": ("--overwrite",), "panel": "Run"})
    command: str = ""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"--mode {self.mode!r}: valid modes are {', '.join(MODES)}")
        if get_dataset(self.dataset).kind == REGRESSION:
            raise ConfigError(f"dataset {self.dataset!r} is a regression; few-shot runs classify (label words per "
                              f"class): give a classification dataset such as sst-binary or cfimdb")
        for what in ("k", "batch_size", "max_length", "ensemble_every", "steps", "test_limit", "self_ensemble"):
            value = getattr(self, what)
            if (value is not None or what in ("k", "batch_size", "max_length", "ensemble_every")) and not _count(value):
                raise ConfigError(f"--{what.replace('_', '-')} must be an integer of at least 1, got {value!r}")
        if self.eval_every is not None and not (_count(self.eval_every) or self.eval_every == 0):
            raise ConfigError(f"--eval-every must be 0 or a positive integer, got {self.eval_every!r}")
        for what, value in (("lr", self.lr), ("head_lr", self.head_lr)):
            if value is not None and not (_real(value) and value > 0):
                raise ConfigError(f"--{what.replace('_', '-')} must be a positive finite number, got {value!r}")
        if self.self_distill is not None:
            if not (_real(self.self_distill) and self.self_distill >= 0):
                raise ConfigError(f"--self-distill must be a finite number >= 0, got {self.self_distill!r}")
            if self.self_ensemble is None:
                raise ConfigError("--self-distill needs --self-ensemble T: the teacher is the average of the last "
                                  "T snapshots of the trainable parameters")
        if self.mode == "zero-shot" and (self.self_ensemble or self.init_from):
            raise ConfigError("zero-shot trains nothing: --self-ensemble, --self-distill and --init-from need "
                              "--mode prompt or head")
        if self.mode == "head" and (self.template or self.verbalizer):
            raise ConfigError("--template and --verbalizer apply to --mode zero-shot and prompt, not head")
        self.seed_list()
        check_device_name(self.device)
        if self.name is not None:
            check_run_name(self.name)
        check_quantize(self.quantize)
        if self.method.name == "full" and self.mode != "zero-shot":
            refuse_base_training(self.quantize, "--method full", COMPONENT_METHODS)

    def seed_list(self) -> list[int]:
        seeds = [str(s).strip() for s in self.seeds]
        if not seeds or not all(_SEEDS.fullmatch(s) for s in seeds) or len(set(seeds)) != len(seeds):
            raise ConfigError(f"--seeds must be distinct non-negative integers, comma-separated, got "
                              f"{','.join(map(str, self.seeds))!r}")
        return [int(s) for s in seeds]

    def budget(self, key: str) -> Any:
        value = getattr(self, key)
        return value if value is not None else (QUICK if self.quick else FULL)[key]

    def run_name(self) -> str:
        if self.name:
            return self.name
        parts = ["fewshot", self.dataset, re.sub(r"[^A-Za-z0-9.+-]+", "-", self.model.rstrip("/").split("/")[-1]),
                 self.mode] + ([] if self.mode == "zero-shot" else [re.sub(r"[^A-Za-z0-9.+]+", "", self.method.label())])
        parts += [f"k{self.k}"] + ([f"ens{self.self_ensemble}"] if self.self_ensemble else []) + (
            [f"sd{self.self_distill:g}"] if self.self_distill is not None else []) + (
            ["tapt"] if self.init_from else []) + ([self.quantize] if self.quantize else []) + (
            ["quick"] if self.quick else [])
        return "-".join(parts)


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class TaptConfig:
    """One TAPT run; the field metadata is the CLI's help."""
    out: str = field(default="", metadata={"help": "the output directory (made; refused if it exists without "
                                                   "--overwrite)", "metavar": "<dir>", "panel": "Run"})
    method: Method = field(default_factory=FewShotMethod)
    dataset: str = field(default="sst-binary", metadata={"help": "whose training-file text to train on",
                                                         "panel": "Task"})
    model: str = field(default="smollm2-135m", metadata={"help": "a causal or masked LM (see run fewshot --model)",
                                                         "panel": "Task"})
    quantize: str | None = field(default=None, metadata=option("Task"))
    data_dir: str | None = field(default=None, metadata={"help": "default: $ADAPTUNE_DATA, else ../shared/data/cs224n",
                                                         "metavar": "<dir>", "panel": "Task"})
    steps: int = field(default=100, metadata={"help": "training steps", "panel": "Budget"})
    batch_size: int = field(default=8, metadata={"help": "texts per step", "panel": "Budget"})
    max_length: int = field(default=128, metadata={"help": "tokens per text", "panel": "Budget"})
    lr: float | None = field(default=None, metadata={"help": "learning rate (default: the method's)",
                                                     "panel": "Training"})
    mlm_probability: float = field(default=0.15, metadata={"help": "share of tokens masked (masked LMs)",
                                                           "panel": "Training"})
    seed: int = field(default=0, metadata={"help": "text order, masking, initialisation", "panel": "Run"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda or cuda:N", "panel": "Run"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output directory",
                                                     "flags": ("--overwrite",), "panel": "Run"})
    command: str = ""

    def __post_init__(self) -> None:
        if not str(self.out).strip():
            raise ConfigError("--out DIR is required: where the TAPT components are written")
        for what in ("steps", "batch_size", "max_length"):
            value = getattr(self, what)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{what.replace('_', '-')} must be an integer of at least 1, got {value!r}")
        if not (isinstance(self.mlm_probability, float) and 0 < self.mlm_probability < 1):
            raise ConfigError(f"--mlm-probability must be in (0, 1), got {self.mlm_probability!r}")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and 0 < self.lr < float("inf")):
            raise ConfigError(f"--lr must be a positive finite number, got {self.lr!r}")
        if self.method.name in ("head-only", "full"):
            raise ConfigError(f"TAPT trains components and saves them; method {self.method.name!r} has none: "
                              f"give a component method (lora, dora, adapter, prefix, prompt, spec, ...)")
        check_quantize(self.quantize)
