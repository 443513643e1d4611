"""Component specs: one file per family."""
from .adapter import Adapter
from .base import Component, Stack
from .dora import DoRA
from .lora import LoRA

__all__ = ["Adapter", "Component", "DoRA", "LoRA", "Stack"]
