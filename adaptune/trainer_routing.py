"""Multitask training in one step: a dataset column names each sample's task (`task_column=` of
`adaptune.trainer.AdapterCheckpoints` and `AdapterTrainer`).

The column's values are task names, indices into the adaptation's `task_names`, or None / -1 (the shared
components only). `TaskColumn` wraps the trainer's data collator: it takes the column out of every sample (the
inner collator never sees it, so TRL's collators and the default ones, which drop strings, need not know it),
maps the values to indices and puts them back in the batch as a (B,) long tensor. The trainer pops that tensor
before the model is called and runs the step inside `adaptation.route(index)`: the forward and the backward,
since gradient checkpointing recomputes the forward during the backward.

Checked before the trainer is built (`check_task_column`): the column's name, that the adaptation has tasks, that
no row mixes samples (TRL's packing and padding-free batches), that DDP may leave parameters without gradient
(a task that no sample of a rank's batch has), and, for each `datasets.Dataset` given, that it has the column and
names only tasks the adaptation has. Other datasets are checked batch by batch.

Under FSDP2 (`AbsentTasks`): a task that no sample of one rank's batch has would leave its components without
gradient on that rank, and FSDP2's reduce-scatter needs the same parameters' gradients on every rank (there is
no find_unused_parameters). So every training step adds 0 × (the sum of each absent task's parameters) to the
loss: those components get a zero gradient, which adds nothing to the other ranks' in the reduction (FSDP2
reduces its group's gradients in the order of its parameters, whatever order the backward produced them in). A
task that no rank had since the last optimizer step gets its gradient set back to None before the step (one
all-reduce of a flag per task), so AdamW leaves it alone as it does in one process.
Refused under DeepSpeed (`check_routing_engine`): ZeRO reduces gradients in the order the backward produces
them, which differs between ranks whose batches hold other tasks (measured: ZeRO-2 trained wrong components
silently, ZeRO-3 aborted)."""
from __future__ import annotations

import inspect
import numbers
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from .adaptation import Adaptation
from .errors import ConfigError, TaskError

SHARED = -1  # a sample that runs the shared components only


def task_indices(values: Iterable[Any], names: Sequence[str], column: str) -> list[int]:
    """Each value of the task column as an index into `names` (SHARED for None and -1); TaskError naming every
    value that names no task, and the tasks there are."""
    out, unknown = [], []
    for value in values:
        if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point():
            value = value.item()
        if value is None:
            out.append(SHARED)
        elif isinstance(value, str) and value in names:
            out.append(list(names).index(value))
        elif isinstance(value, numbers.Integral) and not isinstance(value, bool) and SHARED <= value < len(names):
            out.append(int(value))
        else:
            out.append(SHARED)
            if value not in unknown:
                unknown.append(value)
    if unknown:
        tasks = ", ".join(map(repr, names))
        raise TaskError(f"the column {column!r} names tasks this adaptation does not have: "
                        f"{', '.join(map(repr, unknown[:10]))}{' ...' if len(unknown) > 10 else ''}; its tasks are "
                        f"{tasks} (a sample's task is one of these names or its index 0-{len(names) - 1}; None or "
                        f"-1: the shared components only)")
    return out


class TaskColumn:
    """A data collator that takes `column` out of each sample, collates the rest with `collator`, and adds the
    samples' task indices to the batch as a (B,) long tensor under `column`. Other attributes are the collator's."""

    def __init__(self, collator: Callable, column: str, names: Sequence[str]) -> None:
        self.collator, self.column, self.names = collator, column, tuple(names)

    def __call__(self, features: list[Mapping[str, Any]]) -> Any:
        missing = [f for f in features if self.column not in f]
        if missing:
            raise ConfigError(f"task_column={self.column!r}, but a sample has no such column (its columns: "
                              f"{', '.join(map(repr, missing[0]))}); give every sample its task")
        index = task_indices([f[self.column] for f in features], self.names, self.column)
        batch = self.collator([{k: v for k, v in f.items() if k != self.column} for f in features])
        batch[self.column] = torch.tensor(index, dtype=torch.long)
        return batch

    def __getattr__(self, name: str) -> Any:
        if name == "collator":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.collator, name)


def split_batch(inputs: Mapping[str, Any], column: str) -> tuple[torch.Tensor, dict[str, Any]]:
    """The batch's task index (its `column`) and the model's inputs (the rest); ConfigError without the column."""
    if column not in inputs:
        raise ConfigError(f"task_column={column!r}, but the batch has no such key (its keys: "
                          f"{', '.join(map(repr, inputs))}): the trainer's data collator adds it; a data loader of "
                          f"your own must too")
    rest = {k: v for k, v in inputs.items() if k != column}
    return inputs[column], rest


def check_routing_engine(column: str, asked: list[str], who: str) -> None:
    """ConfigError for a task column under DeepSpeed (`asked`: how it was asked for; [] when it was not)."""
    if asked:
        raise ConfigError(f"{who}: task_column={column!r} is supported with one process, DDP and FSDP2, not under "
                          f"DeepSpeed ({', '.join(asked)}): ZeRO reduces the components' gradients in the order the "
                          f"backward produces them, and ranks whose batches hold other tasks produce them in other "
                          f"orders (measured on 2 ranks: ZeRO-2 trained wrong components without an error, ZeRO-3 "
                          f"aborted); train multitask under FSDP2 or DDP, or without task_column")


class AbsentTasks:
    """Under FSDP2 every task's components get a gradient at every training step, a zero one where a rank's batch
    lacks the task (see the module doc). `seen(index, adaptation)` for each batch routed, `term()` the zero to add
    to its loss, `settle()` before each optimizer step (a collective)."""

    def __init__(self) -> None:
        self.adaptation: Adaptation | None = None  # the adaptation of the batches (seen())
        self.batch: set[int] = set()  # the tasks of the batch being trained
        self.since_step: set[int] = set()  # the tasks any batch of this rank had since the last optimizer step

    def seen(self, index: torch.Tensor, adaptation: Adaptation) -> None:
        self.adaptation, self.batch = adaptation, set(index.tolist())
        self.since_step |= self.batch

    def _params(self, absent: Iterable[int]) -> list[nn.Parameter]:
        names = self.adaptation.task_names
        return [p for i in absent for p in self.adaptation.tasks[names[i]].parameters() if p.requires_grad]

    def term(self) -> torch.Tensor | None:
        """0 × the sum of the parameters of every task absent from the batch (None: none is absent)."""
        every = range(len(self.adaptation.task_names))
        params = self._params(i for i in every if i not in self.batch)
        if not params:
            return None
        return torch.stack([p.sum().float() for p in params]).sum() * 0.0

    def settle(self) -> None:
        """Before the optimizer step: the gradients of the tasks no rank had since the last step go back to None
        (AdamW then leaves them alone, as in one process)."""
        had, self.since_step = self.since_step, set()
        if self.adaptation is None:
            return
        import torch.distributed as dist
        flags = torch.zeros(len(self.adaptation.task_names))
        flags[[i for i in had if i >= 0]] = 1.0
        if dist.is_available() and dist.is_initialized():
            flags = flags.to(next(iter(self.adaptation.parameters())).device)  # nccl: on the device
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        for p in self._params(i for i, f in enumerate(flags.tolist()) if f == 0):
            p.grad = None


def check_task_column(column: Any, adaptation: Adaptation | None, model: nn.Module | None, args: Any,
                      datasets: Mapping[str, Any], who: str) -> None:
    """ConfigError or TaskError for a task column `who` cannot route by (see the module doc); `adaptation` and
    `model` None: not made yet (model_init), checked once they are."""
    if not isinstance(column, str) or not column:
        raise ConfigError(f"{who}: task_column names the dataset column that holds each sample's task, a "
                          f"non-empty string; got {column!r}")
    mixing = [f"{k}=True" for k in ("packing", "eval_packing", "padding_free") if getattr(args, k, None) is True]
    if mixing:
        raise ConfigError(f"{who}: task_column={column!r} routes each sample to its task, but {', '.join(mixing)} "
                          f"puts several samples in one row, which has one task; set packing=False and "
                          f"padding_free=False")
    if getattr(args, "ddp_find_unused_parameters", None) is False:
        raise ConfigError(f"{who}: task_column={column!r} leaves the components of a task that no sample of a "
                          f"batch has without gradient, which DDP allows with ddp_find_unused_parameters=True only; "
                          f"drop ddp_find_unused_parameters=False (unset, {who} sets it to True)")
    if model is not None and column in inspect.signature(model.forward).parameters:
        raise ConfigError(f"{who}: task_column={column!r} is an input of {type(model).__name__}.forward, and the "
                          f"task column is taken out of the batch before the model runs; name it otherwise")
    if adaptation is None:
        return
    if not adaptation.task_names:
        raise ConfigError(f"{who}: task_column={column!r} routes each sample to its task's components, but the "
                          f"model's adaptation has no tasks; attach them (adaptune.attach(model, shared, "
                          f"tasks={{'name': spec, ...}})), or drop task_column")
    for what, dataset in datasets.items():
        names = getattr(dataset, "column_names", None)
        if not isinstance(names, list):  # datasets.Dataset (and IterableDataset once its features are known)
            continue
        if column not in names:
            raise ConfigError(f"{who}: task_column={column!r}, but the {what} dataset has no such column; its "
                              f"columns: {', '.join(map(repr, names))}")
        if hasattr(dataset, "unique"):
            task_indices(dataset.unique(column), adaptation.task_names, column)
