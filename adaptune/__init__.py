"""adaptune: composable parameter-efficient fine-tuning for PyTorch and Hugging Face transformers."""
from .adaptation import Adaptation
from .attach import attach, detach
from .components import Adapter, Component, DoRA, LoRA, Stack
from .errors import (AdaptuneError, BindError, ConfigError, LoadError, MergeError, SiteError,
                     TaskError)

__version__ = "0.1.0"

__all__ = [
    "Adaptation", "Adapter", "AdaptuneError", "BindError", "Component", "ConfigError", "DoRA",
    "LoRA", "LoadError", "MergeError", "SiteError", "Stack", "TaskError", "attach", "detach",
]
