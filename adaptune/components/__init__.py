"""Components: one file per family."""
from .adapter import Adapter
from .base import Component, Stack
from .dora import DoRA
from .hyper import HyperAdapter
from .lora import LoRA
from .prefix import Prefix
from .prompt import PromptTuning
from .trainable import BitFit, Trainable

__all__ = ["Adapter", "BitFit", "Component", "DoRA", "HyperAdapter", "LoRA", "Prefix", "PromptTuning", "Stack",
           "Trainable"]
