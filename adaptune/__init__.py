"""adaptune: composable parameter-efficient fine-tuning for PyTorch and Hugging Face transformers.

The names below are imported on first use (PEP 562), so `import adaptune` and the CLI's start import no torch:
`from adaptune import attach, LoRA` imports what they need then."""
import importlib
import sys
import types
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the same names, for type checkers and editors
    from .accounting import Counts
    from .adaptation import Adaptation
    from .attach import attach, counts, detach
    from .combine import combine
    from .merged import merged_float
    from .components import (PSA, Adapter, AtM, Bidirectional, BitFit, Component, DoRA, HyperAdapter, LoRA, Prefix,
                             PromptTuning, Stack, Trainable)
    from .errors import AdaptuneError, BindError, ConfigError, LoadError, MergeError, SiteError, TaskError, WriteError
    from .experiments.common.errors import DataError, TrainingError
    from .peft_export import export_peft
    from .peft_import import import_peft
    from .quantized import quantize
    from .save_load import load, save
    from .spec import parse_spec

__version__ = "0.1.0"

_EXPORTS = {  # name -> the module it comes from
    **dict.fromkeys(["Adaptation"], ".adaptation"),
    **dict.fromkeys(["Counts"], ".accounting"),
    **dict.fromkeys(["attach", "counts", "detach"], ".attach"),
    **dict.fromkeys(["combine"], ".combine"),
    **dict.fromkeys(["merged_float"], ".merged"),
    **dict.fromkeys(["quantize"], ".quantized"),
    **dict.fromkeys(["export_peft"], ".peft_export"),
    **dict.fromkeys(["import_peft"], ".peft_import"),
    **dict.fromkeys(["load", "save"], ".save_load"),
    **dict.fromkeys(["parse_spec"], ".spec"),
    **dict.fromkeys(["PSA", "Adapter", "AtM", "Bidirectional", "BitFit", "Component", "DoRA", "HyperAdapter", "LoRA",
                     "Prefix", "PromptTuning", "Stack", "Trainable"], ".components"),
    **dict.fromkeys(["AdaptuneError", "BindError", "ConfigError", "LoadError", "MergeError", "SiteError", "TaskError",
                     "WriteError"], ".errors"),
    **dict.fromkeys(["DataError", "TrainingError"], ".experiments.common.errors"),  # the experiments' own errors
}

__all__ = [
    "Adaptation", "Adapter", "AdaptuneError", "BindError", "Component", "ConfigError", "DoRA", "HyperAdapter",
    "LoRA", "LoadError", "MergeError", "SiteError", "Stack", "TaskError", "attach", "detach",
    "export_peft", "import_peft", "combine", "merged_float", "quantize",
    "Counts", "counts", "load", "parse_spec", "save",
    "DataError", "Prefix", "PromptTuning", "TrainingError", "WriteError", "BitFit", "Trainable",
    "AtM", "Bidirectional", "PSA",
]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """Importing a submodule binds it on its package: adaptune.attach (the module) would hide adaptune.attach
    (the function) once anything imports the module first. A submodule named like an export is not bound."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
