"""Hugging Face Trainer with adapter-only checkpoints.

`AdapterCheckpoints` is a mixin for any `transformers.Trainer` subclass (`class T(AdapterCheckpoints, SFTTrainer)`,
the mixin first): its checkpoints and `save_model` hold the adaptation (`adapters.safetensors`, the file
`adaptune.save` writes) instead of the base weights, and its `train(resume_from_checkpoint=...)` and
`load_best_model_at_end` load it back into the model's components in place. Optimizer, scheduler, RNG and trainer
state are saved and restored by Trainer as usual, so a resumed run ends where an uninterrupted one does.
`AdapterTrainer` is the mixin on `transformers.Trainer` itself.

Multitask training in one step: `task_column="task"` names a dataset column holding each sample's task (a name,
an index, or None for the shared components only), and every training and evaluation step runs inside
`adaptation.route(...)`, so several tasks' components (of any type) train together on the one frozen base, each
sample's gradients reaching only its task's components and the shared ones (adaptune.trainer_routing). One
process, DDP (find_unused_parameters) and FSDP2 (every absent task's components get a zero gradient:
`trainer_routing.AbsentTasks`); refused under DeepSpeed (`trainer_routing.check_routing_engine`).

A callback alone cannot do this: Trainer writes the full weights before `on_save` runs, and on resume it
refuses a checkpoint without them before any callback is called. Hence the two overrides, `_save` and
`_load_from_checkpoint` (as Trainer special-cases PEFT models in the same two places). Arguments it cannot
honour (FSDP1 and XLA's FSDP, an output directory that is a file, a PEFT config) are refused before Trainer
makes anything.

Sharded engines (Accelerate's, as Trainer sets them up from `TrainingArguments(fsdp=..., deepspeed=...)` or
`accelerate launch`), where saving and loading are collectives that every rank calls, as Trainer's own are there:
- FSDP2 (`fully_shard`; the components are DTensors in the root's group): adapters.safetensors is gathered whole
  and written once by rank 0 (`Adaptation.save` under FSDP2), and loaded back into the shards; the optimizer state
  is Accelerate's (`save_fsdp_optimizer` / `load_fsdp_optimizer`: the components' state only, since nothing else
  trains), without the whole-model file Trainer would write beside it.
- DeepSpeed (ZeRO-1/2/3): under ZeRO-3 the components' partitions are gathered (`deepspeed.zero.GatheredParameters`)
  before rank 0 writes, and a component that is still an empty partition is never written; loading fills the
  gathered components on every rank and rank 0's values go back into the partitions. The optimizer state is
  DeepSpeed's own checkpoint (`global_stepN/`: its fp32 master copies and moments of the components, per rank)
  written with `exclude_frozen_parameters=True`, so it holds no base weight either; on resume it is loaded without
  DeepSpeed's module load (whose strict check wants the base), the components coming from adapters.safetensors.
A checkpoint resumes under the engine that wrote it (its optimizer state is that engine's format); another
engine's checkpoint is a LoadError before anything runs.

`BaseReference(model)` stands in for the frozen reference model of trainers that compare a policy with its
starting point (TRL's `DPOTrainer(ref_model=...)`): the same model run with its components disabled, so the base
is not held twice.
"""
from __future__ import annotations

import inspect
import json
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer import SCHEDULER_NAME, TRAINING_ARGS_NAME
from transformers.trainer_pt_utils import reissue_pt_warnings
from transformers.trainer_utils import get_last_checkpoint

from .adaptation import Adaptation
from .errors import ConfigError, LoadError, WriteError
from .save_format import agree, check_finite, is_sharded, on_rank0, read
from .save_load import load
from .trainer_engines import ADAPTERS_FILE, ENGINES, no_module_load, check_arguments, check_directory, \
    deepspeed_asked, written_by, zero3_gathered
from .trainer_routing import AbsentTasks, TaskColumn, check_routing_engine, check_task_column, split_batch


def adaptation_of(model: Any, who: str = "AdapterTrainer") -> Adaptation:
    """`model`'s adaptation (the model registers it as its submodule `adaptune`); ConfigError naming `who`
    when there is none."""
    found = getattr(model, "adaptune", None)
    if isinstance(found, Adaptation):
        return found
    if isinstance(model, (str, os.PathLike)):
        raise ConfigError(f"{who} needs a model with an adaptation, not the model name {str(model)!r}: load the "
                          f"model, call adaptune.attach(model, ...), and pass the model")
    raise ConfigError(f"{who} needs a model with an adaptation; {type(model).__name__} has none: "
                      f"call adaptune.attach(model, ...) before building the trainer")


def adaptation_for_training(model: nn.Module, who: str = "AdapterTrainer") -> Adaptation:
    """`model`'s adaptation, checked to be all that trains: ConfigError when there is none, or when base
    parameters require grad (an adapter-only checkpoint would lose them)."""
    found = adaptation_of(model, who)
    base = [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("adaptune.")]
    if base:
        raise ConfigError(f"{who} saves only the adaptation, but {len(base)} base parameters train "
                          f"and would be lost from its checkpoints: {', '.join(base[:3])}; freeze them "
                          f"(attach froze them) or use transformers.Trainer")
    return found


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


def _given(init: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The arguments of a call to `init` by parameter name ({} when they do not fit: `init` then says why)."""
    try:
        return dict(inspect.signature(init).bind(*args, **kwargs).arguments)
    except (TypeError, ValueError):
        return {}


class AdapterCheckpoints:
    """Adapter-only checkpoints for a transformers.Trainer subclass: put it first among the bases,
    `class T(AdapterCheckpoints, SFTTrainer)`. Checkpoints hold adapters.safetensors, the optimizer, scheduler,
    RNG and trainer state; resume loads the adapters into the model's components and ends bit-exact.

    The model must carry an adaptation (attach first) and nothing else may train. Refused before the trainer
    is built: FSDP1 and XLA's FSDP, an output directory that is a file, and `peft_config` (TRL would wrap the model
    in PEFT adapters these checkpoints do not hold). Single process, DDP, FSDP2 and DeepSpeed ZeRO-1/2/3 (see the
    module doc); under FSDP2 and DeepSpeed `save_model` is a collective that every rank calls.

    task_column: the dataset column naming each sample's task (names, indices, None / -1 for shared only); each
    training and prediction step then routes every sample to its task's components (see the module doc). Refused
    before the trainer is built: an adaptation without tasks, tasks the adaptation lacks in a `datasets.Dataset`'s
    column or the column missing there, TRL's packing / padding-free batches (several samples in one row), and
    ddp_find_unused_parameters=False (under DDP a task that no sample of a rank's batch has gets no gradient there;
    unset, it is set to True)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        if Trainer in mro and mro.index(Trainer) < mro.index(AdapterCheckpoints):
            raise TypeError(f"{cls.__name__}: AdapterCheckpoints must come before the Trainer class among the bases "
                            f"(class {cls.__name__}(AdapterCheckpoints, ...)), else Trainer's own saving and loading "
                            f"run instead of its adapter-only ones")

    def __init__(self, *args: Any, task_column: str | None = None, **kwargs: Any) -> None:
        who = type(self).__name__
        if not isinstance(self, Trainer):
            raise TypeError(f"{who}: AdapterCheckpoints is a mixin for transformers.Trainer subclasses "
                            f"(class {who}(AdapterCheckpoints, Trainer)); {who} is none")
        self.task_column = task_column
        given = _given(super().__init__, args, kwargs)
        check_arguments(given.get("args"), who)  # before Trainer builds an accelerator and makes the output directory
        if given.get("peft_config") is not None:
            raise ConfigError(f"{who} trains the model's adaptune components, but peft_config asks the trainer to "
                              f"wrap the model in PEFT adapters, which its checkpoints would not hold; drop "
                              f"peft_config (attach adaptune components instead)")
        if isinstance(given.get("ref_model"), BaseReference) and getattr(given.get("args"), "sync_ref_model", False):
            raise ConfigError(f"{who}: ref_model=BaseReference(model) is the base and stays the base, but "
                              f"sync_ref_model=True moves the reference toward the policy; pass a frozen copy of the "
                              f"model as ref_model, or drop sync_ref_model")
        model = given.get("model")
        adaptation = adaptation_for_training(model, who) if model is not None else None  # None: model_init
        if task_column is not None:
            evals = given.get("eval_dataset")
            datasets = {"train": given.get("train_dataset"),
                        **({f"eval {k!r}": v for k, v in evals.items()} if isinstance(evals, dict) else {"eval": evals})}
            check_task_column(task_column, adaptation, model, given.get("args"), datasets, who)
            check_routing_engine(task_column, deepspeed_asked(given.get("args")), who)
            if getattr(given.get("args"), "ddp_find_unused_parameters", False) is None:  # DDP: the components of
                given["args"].ddp_find_unused_parameters = True  # a task no sample of a rank's batch has get no grad
        super().__init__(*args, **kwargs)
        if self._engine() == "fsdp" and getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2:
            raise ConfigError(f"{who} supports FSDP2 (fully_shard), not FSDP1, whose flattened parameters are not the "
                              f"components' own: use TrainingArguments(fsdp=True, fsdp_config={{'version': 2}}) or "
                              f"accelerate launch --use_fsdp --fsdp_version 2")
        if getattr(self.args, "fsdp", None) and self._engine() is None and self.args.world_size > 1:
            warnings.warn(f"{who}: fsdp=True, but Accelerate did not turn FSDP on (it does for GPU-like devices only, "
                          f"not on the CPU): the ranks train under DDP, each holding the whole model", stacklevel=2)
        if self._engine() == "deepspeed" and not hasattr(Trainer, "_prepare_for_training"):
            raise ConfigError(f"{who} resumes DeepSpeed checkpoints through Trainer._prepare_for_training, which this "
                              f"transformers lacks; upgrade transformers (tested with 5.24)")
        if self.model is not None:  # the model as the trainer keeps it (a subclass may have changed it)
            adaptation = self._adaptation()
            if task_column is not None:
                check_task_column(task_column, adaptation, self.model, self.args, {}, who)
                check_routing_engine(task_column, ["DeepSpeed"] * (self._engine() == "deepspeed"), who)
                self.data_collator = TaskColumn(self.data_collator, task_column, adaptation.task_names)
        self._absent = None  # under FSDP2 with a task column: absent tasks' zero gradients
        if task_column is not None and self._engine() == "fsdp":
            self._absent = AbsentTasks()
            self.add_callback(_SettleAbsent(self._absent))

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
        if resume_from_checkpoint is not None:
            self._check_resumable(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _check_resumable(self, checkpoint: str | os.PathLike) -> None:
        """LoadError unless `checkpoint` is one of these checkpoints with the optimizer state of this trainer's
        engine (or none, from save_only_model)."""
        if not (Path(checkpoint) / ADAPTERS_FILE).is_file():
            raise LoadError(f"{str(checkpoint)!r} holds no {ADAPTERS_FILE}: it is not a checkpoint written by "
                            f"AdapterTrainer or AdapterCheckpoints")
        wrote, runs = written_by(checkpoint), self._engine()
        if wrote is not False and wrote != runs:
            raise LoadError(f"{str(checkpoint)!r} holds the optimizer state that {ENGINES[wrote]} writes, and this "
                            f"trainer runs {ENGINES[runs]}, which cannot read it: resume under the engine that wrote "
                            f"it (the adapters alone load anywhere: adaptune.load(model, "
                            f"'{Path(checkpoint) / ADAPTERS_FILE}'))")

    def _engine(self) -> str | None:
        """"fsdp" (FSDP2) or "deepspeed" when Accelerate shards the training through one of them; None for one
        process and DDP."""
        if getattr(self, "is_fsdp_enabled", False):
            return "fsdp"
        if getattr(self, "is_deepspeed_enabled", False):
            return "deepspeed"
        return None

    def _set_signature_columns_if_needed(self) -> None:
        """The model's inputs as Trainer finds them, and the task column: `remove_unused_columns` keeps it."""
        super()._set_signature_columns_if_needed()
        if self.task_column is not None and self.task_column not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, self.task_column]

    @contextmanager
    def _routed(self, inputs: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The batch without the task column, inside a route of its samples to their tasks (no task column: the
        batch as it is, unrouted)."""
        if self.task_column is None:
            yield inputs
            return
        tasks, rest = split_batch(inputs, self.task_column)
        if self._absent is not None:
            self._absent.seen(tasks, self._adaptation())
        with self._adaptation().route(tasks):
            yield rest

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     **kwargs: Any) -> Any:
        """The trainer's loss; in training under FSDP2 with a task column, plus the zero that gives
        the components of the tasks absent from the batch their (zero) gradient (trainer_routing.AbsentTasks)."""
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        term = self._absent.term() if self._absent is not None and model.training else None
        if term is None:
            return out
        if return_outputs:
            return out[0] + term.to(out[0].dtype), out[1]
        return out + term.to(out.dtype)

    def training_step(self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> torch.Tensor:
        """Trainer's step; with a task column, the forward and the backward (which gradient checkpointing runs
        the forward again in) inside the batch's route."""
        with self._routed(inputs) as inputs:
            return super().training_step(model, inputs, *args, **kwargs)

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        """Trainer's evaluation step; with a task column, inside the batch's route."""
        with self._routed(inputs) as inputs:
            return super().prediction_step(model, inputs, *args, **kwargs)

    def _adaptation(self, model: nn.Module | None = None) -> Adaptation:
        model = self.model if model is None else model
        return adaptation_for_training(self.accelerator.unwrap_model(model, keep_torch_compile=False),
                                       type(self).__name__)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Trainer.save_model, writing adapters.safetensors, the processing class and the arguments. Under FSDP2
        and DeepSpeed a collective, as Trainer's own is there: every rank calls it (Trainer's would gather the
        whole model first)."""
        if self._engine() is None:
            return super().save_model(output_dir, _internal_call)
        self._save(output_dir)
        if self.args.push_to_hub and not _internal_call:
            revision = {"revision": self.args.hub_revision} if hasattr(self.args, "hub_revision") else {}
            self.push_to_hub(commit_message="Model save", **revision)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write adapters.safetensors (not the base weights), the processing class and the arguments. Under FSDP2
        and DeepSpeed every rank comes here: the components are gathered whole and rank 0 writes."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        engine = self._engine()
        if not self.args.should_save and engine is None:
            return
        adaptation = self._adaptation()
        check_directory(output_dir, type(self).__name__)
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
        path = Path(output_dir) / ADAPTERS_FILE
        if engine == "deepspeed":
            with zero3_gathered(adaptation):
                empty = [k for k, v in adaptation.state_dict().items() if v.numel() == 0]
                if empty:  # on every rank alike: each raises
                    raise WriteError(f"cannot save to {str(path)!r}: components {', '.join(empty[:3])} are empty "
                                     f"tensors (partitions DeepSpeed did not gather), which would be saved as such")
                on_rank0("save", path, adaptation, lambda: adaptation.save(path))
        else:  # FSDP2: a collective, gathered and written by rank 0; else rank 0 alone comes here
            adaptation.save(path)
        if not self.args.should_save:
            return
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Trainer's, without the base: under FSDP2 Accelerate's optimizer state alone (Trainer writes the whole
        model beside it), under DeepSpeed its checkpoint with exclude_frozen_parameters=True."""
        engine = self._engine()
        if engine is None:
            return super()._save_optimizer_and_scheduler(output_dir)
        own_scheduler = True
        if engine == "fsdp":
            from accelerate.utils import save_fsdp_optimizer
            save_fsdp_optimizer(self.accelerator.state.fsdp_plugin, self.accelerator, self.optimizer, self.model,
                                output_dir)
        else:
            from accelerate.utils import DeepSpeedSchedulerWrapper
            self.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=True)
            own_scheduler = not isinstance(self.lr_scheduler, DeepSpeedSchedulerWrapper)  # else in DeepSpeed's
        if self.args.should_save and own_scheduler:
            with warnings.catch_warnings(record=True) as caught:
                torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))
            reissue_pt_warnings(caught)

    def _prepare_for_training(self, max_steps: int, train_dataloader: Any, resume_from_checkpoint: Any) -> Any:
        """Trainer's; a DeepSpeed resume is this class's own: the components from adapters.safetensors, DeepSpeed's
        optimizer state from its global_stepN/ (without its module load), then Trainer's scheduler and scaler."""
        if resume_from_checkpoint is None or self._engine() != "deepspeed":
            return super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, None)
        self._load_from_checkpoint(resume_from_checkpoint)
        if written_by(resume_from_checkpoint) is False:  # save_only_model: the components alone, as Trainer does
            return model, train_dataloader
        loaded, _ = self.model_wrapped.load_checkpoint(resume_from_checkpoint, load_optimizer_states=True,
                                                       load_lr_scheduler_states=True,
                                                       custom_load_fn=no_module_load)
        if loaded is None:
            raise LoadError(f"DeepSpeed found no checkpoint to resume in {str(resume_from_checkpoint)!r} (its "
                            f"'latest' file names the global_stepN folder)")
        self._load_optimizer_and_scheduler(resume_from_checkpoint)
        self._load_scaler(resume_from_checkpoint)
        return model, train_dataloader

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Load the checkpoint's adapters.safetensors into the model's components (under FSDP2 and DeepSpeed on
        every rank: into the shards, or the gathered partitions)."""
        path = Path(resume_from_checkpoint) / ADAPTERS_FILE
        if not path.is_file():
            raise LoadError(f"{str(resume_from_checkpoint)!r} holds no {ADAPTERS_FILE}: it is not a checkpoint "
                            f"written by AdapterTrainer or AdapterCheckpoints")
        adaptation, engine = self._adaptation(model), self._engine()
        if engine == "fsdp" and is_sharded(adaptation):
            load(adaptation.model, path)  # a collective: every rank reads the file and fills its shards
        elif engine == "deepspeed":
            with zero3_gathered(adaptation, write=True):
                error = None
                try:
                    load_into(adaptation, path)
                except Exception as e:  # raised on every rank together, not on one while the others wait
                    error = e
                agree("load", path, adaptation, error, LoadError)
        else:
            load_into(adaptation, path)

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)
        optimizer = getattr(self.model_wrapped, "optimizer", None)  # DeepSpeed's fp32 masters follow the components
        if self._engine() == "deepspeed" and hasattr(optimizer, "refresh_fp32_params"):
            optimizer.refresh_fp32_params()


class _SettleAbsent(TrainerCallback):
    """Calls AbsentTasks.settle() before each optimizer step."""

    def __init__(self, absent: AbsentTasks) -> None:
        self.absent = absent

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.absent.settle()


class AdapterTrainer(AdapterCheckpoints, Trainer):
    """transformers.Trainer saving and resuming only the adaptation of its model (see the module doc).

    Single process, DDP, FSDP2 and DeepSpeed ZeRO-1/2/3; FSDP1 and XLA's FSDP are refused."""


class BaseReference(nn.Module):
    """`model` run with every component disabled: the base, as a reference model (TRL's
    `DPOTrainer(model, ref_model=BaseReference(model), ...)`) without a second copy of its weights.

    Calling it runs `model` inside `model.adaptune.disabled()` and in eval mode (no dropout, as a frozen copy
    would run; each module's mode is restored after); any other attribute (config, base_model,
    get_output_embeddings, ...) is the model's, so code that patches or inspects a reference model finds what it
    expects. It holds no parameters of its own (the model is not its submodule), and its state_dict is the base's
    (the model's without the components). Call it outside merge (disabling components needs them unmerged).

    The base is the right reference while the policy starts as the base (components that start as the identity, as a
    fresh LoRA does). Components trained before (SFT) are part of the reference: pass a frozen copy of that model, or
    ref_model=None with DPOConfig(precompute_ref_log_probs=True) (the model as it is before training)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        adaptation_of(model, "BaseReference")
        object.__setattr__(self, "policy", model)  # not a submodule: optimizers and wrappers never see it twice

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "policy" not in self.__dict__:
                raise
            return getattr(self.__dict__["policy"], name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        modes = [(m, m.training) for m in self.policy.modules()]
        try:
            self.policy.eval()  # no dropout, as in a frozen copy; each module's mode is restored after
            with self.policy.adaptune.disabled():
                return super().__call__(*args, **kwargs)
        finally:
            for module, training in modes:
                module.training = training

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.policy(*args, **kwargs)

    def state_dict(self, *, prefix: str = "", keep_vars: bool = False) -> dict[str, Any]:
        full = self.policy.state_dict(prefix=prefix, keep_vars=keep_vars)
        return {k: v for k, v in full.items() if not k.startswith(f"{prefix}adaptune.")}


__all__ = ["ADAPTERS_FILE", "AdapterCheckpoints", "AdapterTrainer", "BaseReference", "adaptation_for_training",
           "check_arguments", "load_into", "written_by", "zero3_gathered"]
