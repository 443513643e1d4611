"""The engines AdapterTrainer runs under (one process, DDP, Accelerate's FSDP2, DeepSpeed ZeRO-1/2/3): the training
arguments it refuses, which engine wrote a checkpoint, and the gathering of ZeRO-3's partitioned components."""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

from torch import nn

from .errors import ConfigError, WriteError

ADAPTERS_FILE = "adapters.safetensors"


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def check_arguments(args: Any, who: str = "AdapterTrainer") -> None:
    """ConfigError for training arguments `who` cannot honour: FSDP1 and XLA's FSDP (set in the arguments or by
    `accelerate launch`), whose flattened parameters are not the components' own (FSDP2 and DeepSpeed are
    supported); WriteError for an output directory that is a file."""
    if args is None:
        return
    used = []
    if getattr(args, "fsdp", None):
        version = (getattr(args, "fsdp_plugin_args", None) or {}).get("fsdp_version", 2)
        config = getattr(args, "fsdp_config", None)
        if version != 2:
            used.append(f"fsdp_config={{'version': {version}}}")
        if isinstance(config, dict) and config.get("xla"):
            used.append("fsdp_config={'xla': True}")
    elif _flag("ACCELERATE_USE_FSDP") and os.environ.get("FSDP_VERSION", "1") != "2":
        used.append(f"ACCELERATE_USE_FSDP=true with FSDP_VERSION={os.environ.get('FSDP_VERSION', '1 (unset)')} in "
                    f"the environment (accelerate launch --use_fsdp without --fsdp_version 2)")
    if used:
        raise ConfigError(f"{who} supports FSDP2 (fully_shard) and DeepSpeed, not FSDP1 or XLA's FSDP, whose "
                          f"flattened parameters are not the components' own; the training arguments ask for "
                          f"{', '.join(used)}. Use FSDP2: TrainingArguments(fsdp=True, fsdp_config={{'version': 2}}) "
                          f"(version 2 is the default) or accelerate launch --use_fsdp --fsdp_version 2")
    check_directory(args.output_dir, who)


def deepspeed_asked(args: Any) -> list[str]:
    """How the training arguments or `accelerate launch` ask for DeepSpeed ([] when they do not)."""
    asked = ["deepspeed"] if getattr(args, "deepspeed", None) else []
    return asked + ["ACCELERATE_USE_DEEPSPEED=true in the environment"] * _flag("ACCELERATE_USE_DEEPSPEED")


def check_directory(path: str | os.PathLike, who: str = "AdapterTrainer") -> None:
    """WriteError when `path` exists and is not a directory (checkpoints and save_model write directories)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise WriteError(f"cannot save to {str(path)!r}: it is a file, and {who} writes a directory "
                         f"there ({ADAPTERS_FILE}, training_args.bin, ...); give a directory path")


@contextmanager
def zero3_gathered(what: nn.Module | Iterable[nn.Parameter], write: bool = False) -> Iterator[None]:
    """Inside: those parameters of `what` (a module, e.g. the adaptation, or parameters) that DeepSpeed ZeRO-3
    partitions are whole on every rank (a collective: every rank enters); write=True: rank 0's values go back into
    the partitions on the way out. Without partitioned parameters (no DeepSpeed, ZeRO-1/2, parameters below
    ZeRO-3's persistence threshold) nothing happens."""
    params = what.parameters() if isinstance(what, nn.Module) else what
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed
    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0 if write else None):
        yield


ENGINES = {"fsdp": "FSDP2", "deepspeed": "DeepSpeed", None: "one process or DDP"}


def written_by(checkpoint: str | os.PathLike) -> str | None | bool:
    """The engine whose optimizer state `checkpoint` holds (a key of ENGINES); False when it holds none
    (save_only_model)."""
    names = os.listdir(checkpoint)
    folders = [n for n in names if os.path.isdir(os.path.join(checkpoint, n))]
    if any(n.startswith("global_step") for n in folders):
        return "deepspeed"
    if "optimizer.bin" in names or any(n.startswith("optimizer_") for n in folders):
        return "fsdp"
    return None if "optimizer.pt" in names else False


def no_module_load(src: dict, dst: nn.Module) -> None:
    """DeepSpeed's module load on resume, left out: its state holds the components only (no base, which its strict
    load would want), and they were loaded from adapters.safetensors already."""
