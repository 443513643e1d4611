"""--quantize: a run's frozen base in 4 or 8 bits (bitsandbytes nf4, fp4, int8; adaptune.quantize), the same way
for `run multitask`, `run fewshot`, `tapt` and `run vae`.

  check_quantize        the option's value: None (a float base) or one of QUANTIZATIONS, else a ConfigError
  refuse_base_training  a ConfigError for a setting that trains the base's own weights (method full, the VAE's
                        --finetune): a quantized weight is frozen codes, with no gradient
  quantize_base         the loaded base quantized in place on the run's device, before components attach
  quantized_layers      what results.json records: the quantized layers of the base, by class
  binding               a component that needs a float weight (Trainable on a projection) refused as a ConfigError

Importing this module imports no torch (the CLI builds its options from the configs that use it)."""
from __future__ import annotations

import logging
from collections import Counter
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

from ...errors import BindError, ConfigError

if TYPE_CHECKING:
    from torch import nn

QUANTIZATIONS = ("nf4", "fp4", "int8")  # adaptune.quantized.SCHEMES, named here without importing torch
BNB_LOGGER = "bitsandbytes.autograd._functions"  # where LLM.int8()'s per-forward warning comes from
COMPONENTS = "LoRA, DoRA, BitFit, Adapter, Prefix, PromptTuning, HyperAdapter"  # what binds to a quantized base


def option(panel: str) -> dict:
    """The field metadata of a config's `quantize` field: the CLI's --quantize option."""
    return {"help": f"quantize the frozen base's Linear layers (heads excepted) to {', '.join(QUANTIZATIONS)} "
                    f"(bitsandbytes) as it is loaded, before components attach; default: none (a float base). "
                    f"Components train in float32 on it; the base's own weights cannot train",
            "metavar": "|".join(QUANTIZATIONS), "panel": panel}


def check_quantize(value: Any) -> None:
    """None or one of QUANTIZATIONS, else a ConfigError naming the valid values."""
    if value is not None and value not in QUANTIZATIONS:
        raise ConfigError(f"--quantize {value!r} is not a quantization: give {', '.join(QUANTIZATIONS[:-1])} or "
                          f"{QUANTIZATIONS[-1]} (bitsandbytes), or leave --quantize out for a float base")


def refuse_base_training(value: str | None, what: str, instead: str) -> None:
    """A ConfigError when the base is quantized (`value`) and `what` trains the base's own weights; `instead`: the
    settings of this command that train components."""
    if value is not None:
        raise ConfigError(f"--quantize {value}: {what} trains the base's own weights, and a quantized base's weights "
                          f"are frozen {value} codes with no gradient (training them needs float weights). With "
                          f"--quantize, train components on the frozen base instead: {instead}; or drop --quantize "
                          f"to train the float base")


def quantize_base(model: nn.Module, value: str | None, device: Any = "cpu", bases: str = "") -> dict[str, int] | None:
    """Quantize `model` in place to `value` on `device` (moved there first: bitsandbytes quantizes where the
    weights are); None when `value` is None, else {layer class: count} of the quantized layers. The random
    stream is left as it was, so components start as on a float base. ConfigError when the base has no nn.Linear
    or Conv1D outside its heads; `bases`: the bases of this command that have them, for the message."""
    check_quantize(value)
    if value is None:
        return None
    import torch

    from ...quantized import quantize

    model.to(device)
    with torch.random.fork_rng(devices=[]):  # the bitsandbytes layers initialise weights they then replace
        quantize(model, value)
    _once(BNB_LOGGER)
    made = quantized_layers(model)
    if not made:
        raise ConfigError(f"--quantize {value}: {type(model).__name__} has no nn.Linear or Conv1D layer outside its "
                          f"heads to quantize; use a base with linear projections"
                          f"{f' ({bases})' if bases else ' (Llama, GPT-2, BERT)'}, or drop --quantize")
    return made


class _Once(logging.Filter):
    """Lets each message (its format string) through once: bitsandbytes' int8 matmul logs the same warning on
    every forward (inputs cast from float32 to float16), which would fill a run's terminal and logs."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = str(record.msg)
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def _once(name: str) -> None:
    logger = logging.getLogger(name)
    if not any(isinstance(f, _Once) for f in logger.filters):
        logger.addFilter(_Once())


@contextmanager
def binding(value: str | None) -> Iterator[None]:
    """Around attaching components to a base quantized to `value`: a component that cannot bind to a quantized
    layer (Trainable on a projection reads it as float weights) is a ConfigError saying why and what works."""
    try:
        yield
    except BindError as e:
        if value is None:
            raise
        raise ConfigError(f"--quantize {value}: {e}") from e


def quantized_layers(model: nn.Module) -> dict[str, int] | None:
    """{layer class: count} of the supported quantized layers of `model` (what results.json records as
    quantized_layers); None when it has none."""
    from ...quantized import scheme

    found = Counter(type(m).__name__ for m in model.modules() if scheme(m))
    return dict(sorted(found.items())) or None
