"""Hugging Face Trainer with adapter-only checkpoints.

`AdapterTrainer` is `transformers.Trainer` whose checkpoints and `save_model` hold the adaptation
(`adapters.safetensors`, the file `adaptune.save` writes) instead of the base weights, and whose
`train(resume_from_checkpoint=...)` and `load_best_model_at_end` load it back into the model's
components in place. Optimizer, scheduler, RNG and trainer state are saved and restored by Trainer as
usual, so a resumed run ends where an uninterrupted one does.

A callback alone cannot do this: Trainer writes the full weights before `on_save` runs, and on resume it
refuses a checkpoint without them before any callback is called. Hence the two overrides, `_save` and
`_load_from_checkpoint` (as Trainer special-cases PEFT models in the same two places). Arguments it cannot
honour (DeepSpeed, FSDP, an output directory that is a file) are refused before Trainer makes anything.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import get_last_checkpoint

from .adaptation import Adaptation
from .errors import ConfigError, LoadError, WriteError
from .save_format import check_finite, read

ADAPTERS_FILE = "adapters.safetensors"


def adaptation_for_training(model: nn.Module) -> Adaptation:
    """`model`'s adaptation, checked to be all that trains: ConfigError when there is none, or when base
    parameters require grad (an adapter-only checkpoint would lose them)."""
    found = getattr(model, "adaptune", None)
    if not isinstance(found, Adaptation):
        raise ConfigError(f"AdapterTrainer needs a model with an adaptation; {type(model).__name__} has none: "
                          f"call adaptune.attach(model, ...) before building the trainer")
    base = [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("adaptune.")]
    if base:
        raise ConfigError(f"AdapterTrainer saves only the adaptation, but {len(base)} base parameters train "
                          f"and would be lost from its checkpoints: {', '.join(base[:3])}; freeze them "
                          f"(attach froze them) or use transformers.Trainer")
    return found


def check_arguments(args: Any) -> None:
    """ConfigError for training arguments AdapterTrainer cannot honour: DeepSpeed and FSDP (set in the arguments
    or by `accelerate launch`) save and load sharded weights through other paths than its adapter-only ones."""
    if args is None:
        return
    used = [f"{k}={getattr(args, k)!r}" for k in ("fsdp", "deepspeed") if getattr(args, k, None)]
    used += [f"{k}=true in the environment" for k in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")
             if os.environ.get(k, "false").lower() in ("1", "true", "yes")]
    if used:
        raise ConfigError(f"AdapterTrainer supports single-process and DDP training (torchrun); DeepSpeed and FSDP "
                          f"are not supported, and the training arguments ask for them: {', '.join(used)}. Drop "
                          f"them, or use transformers.Trainer (whose checkpoints hold the whole model)")
    check_directory(args.output_dir)


def check_directory(path: str | os.PathLike) -> None:
    """WriteError when `path` exists and is not a directory (checkpoints and save_model write directories)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise WriteError(f"cannot save to {str(path)!r}: it is a file, and AdapterTrainer writes a directory "
                         f"there ({ADAPTERS_FILE}, training_args.bin, ...); give a directory path")


def load_into(adaptation: Adaptation, path: str | os.PathLike) -> Adaptation:
    """Load a saved adaptation's parameters into `adaptation`'s components in place (optimizers keep
    their references) and make its saved task active. LoadError when the file holds other stacks,
    other shapes, or non-finite numbers; nothing is loaded then."""
    path = Path(path)
    meta, tensors = read(path)
    check_finite(tensors, repr(str(path)))
    here = json.loads(json.dumps(adaptation.spec()))
    if meta["spec"] != here:
        raise LoadError(f"{str(path)!r} holds other components than this model's adaptation: "
                        f"saved {json.dumps(meta['spec'])}, attached {json.dumps(here)}")
    own = adaptation.state_dict()
    wrong = [f"{k}: saved {tuple(t.shape)}, model needs {tuple(own[k].shape)}"
             for k, t in tensors.items() if k in own and t.shape != own[k].shape]
    if set(own) != set(tensors) or wrong:
        missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        raise LoadError(f"{str(path)!r} does not match this model's components: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}, other shapes {wrong[:3]}")
    adaptation.load_state_dict(tensors, strict=True)
    if meta.get("active") != adaptation.task:
        adaptation.use(meta.get("active"))
    return adaptation


class AdapterTrainer(Trainer):
    """transformers.Trainer saving and resuming only the adaptation of its model (see the module doc).

    Single process and DDP; DeepSpeed and FSDP shard or gather weights through other paths and are refused."""

    def __init__(self, model: nn.Module | None = None, args: Any = None, *rest: Any, **kwargs: Any) -> None:
        check_arguments(args)  # before Trainer builds an accelerator and makes the output directory
        if model is not None:  # None with model_init: checked when saving or loading
            adaptation_for_training(model)
        super().__init__(model, args, *rest, **kwargs)
        if getattr(self, "is_deepspeed_enabled", False) or getattr(self, "is_fsdp_enabled", False):
            raise ConfigError("AdapterTrainer supports single-process and DDP training; "
                              "DeepSpeed and FSDP are not supported")

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """Trainer.train; resume_from_checkpoint=True takes the last checkpoint-N in output_dir, and a LoadError
        (before anything runs) when there is none."""
        if resume_from_checkpoint is True:
            out = self.args.output_dir
            resume_from_checkpoint = get_last_checkpoint(out) if os.path.isdir(out) else None
            if resume_from_checkpoint is None:
                state = "holds no checkpoint-N directory" if os.path.isdir(out) else "does not exist"
                raise LoadError(f"resume_from_checkpoint=True resumes from the last checkpoint in output_dir, but "
                                f"{str(out)!r} {state}; train without it, or give a checkpoint directory's path")
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _adaptation(self, model: nn.Module | None = None) -> Adaptation:
        model = self.model if model is None else model
        return adaptation_for_training(self.accelerator.unwrap_model(model, keep_torch_compile=False))

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write adapters.safetensors (not the base weights), the processing class and the arguments."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        adaptation = self._adaptation()
        check_directory(output_dir)
        os.makedirs(output_dir, exist_ok=True)
        adaptation.save(Path(output_dir) / ADAPTERS_FILE)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Load the checkpoint's adapters.safetensors into the model's components."""
        path = Path(resume_from_checkpoint) / ADAPTERS_FILE
        if not path.is_file():
            raise LoadError(f"{str(resume_from_checkpoint)!r} holds no {ADAPTERS_FILE}: it is not a checkpoint "
                            f"written by AdapterTrainer")
        load_into(self._adaptation(model), path)

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)


__all__ = ["ADAPTERS_FILE", "AdapterTrainer", "adaptation_for_training", "check_arguments", "load_into"]
