"""adaptune: composable parameter-efficient fine-tuning for PyTorch and Hugging Face transformers."""
from .adaptation import Adaptation
from .accounting import Counts
from .attach import attach, counts, detach
from .peft_format import export_peft
from .peft_read import import_peft
from .persist import load, save
from .spec import parse_spec
from .components import (PSA, Adapter, AtM, Bidirectional, BitFit, Component, DoRA, HyperAdapter, LoRA, Prefix,
                         PromptTuning, Stack, Trainable)
from .errors import AdaptuneError, BindError, ConfigError, LoadError, MergeError, SiteError, TaskError, WriteError
from .experiments.common.errors import DataError, TrainingError  # the experiments' own errors

__version__ = "0.1.0"

__all__ = [
    "Adaptation", "Adapter", "AdaptuneError", "BindError", "Component", "ConfigError", "DoRA", "HyperAdapter",
    "LoRA", "LoadError", "MergeError", "SiteError", "Stack", "TaskError", "attach", "detach",
    "export_peft", "import_peft",
    "Counts", "counts", "load", "parse_spec", "save",
    "DataError", "Prefix", "PromptTuning", "TrainingError", "WriteError", "BitFit", "Trainable",
    "AtM", "Bidirectional", "PSA",
]
