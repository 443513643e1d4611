"""Components: one file per family; contract.py says what hooks call on their bound modules."""
from .adapter import Adapter
from .base import Component, Stack
from .bidirectional import Bidirectional
from .bitfit import BitFit
from .dora import DoRA
from .hyper import HyperAdapter
from .latent import PSA, AtM
from .lora import LoRA
from .prefix import Prefix
from .prompt import PromptTuning
from .trainable import Trainable

__all__ = ["Adapter", "AtM", "Bidirectional", "BitFit", "Component", "DoRA", "HyperAdapter", "LoRA", "PSA", "Prefix", "PromptTuning", "Stack",
           "Trainable"]
