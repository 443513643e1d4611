"""The Adaptation: every component bound to one model, with task switching and merging.

It is registered on the model as the submodule `adaptune`, so `model.parameters()`, `.to()` and
`state_dict()` see the components, while the base modules keep their own keys.
"""
from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn

from .accounting import Counts, count
from .components.base import Stack
from .components.contract import Context, SharedContext
from .components.hyper import HyperNetwork
from .errors import AdaptuneError, ConfigError, MergeError, TaskError
from .hooks import Binding, Hook, hook_class
from .hooks.condition import Condition
from .hooks.route import Route, checked, route_index
from .save_format import check_state, fsdp_modules, read_sharded, write as write_saved, write_sharded
from .points import Point, check_quantized
from .quantized import keep_differentiable, release
from .sites import SiteMap

Spec = dict[str, Stack]  # selector -> stack: what one group composes
Specs = dict[str | None, Spec]  # group (None = shared, else a task name) -> its spec
_TASK_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass
class _Frozen:
    flags: dict[str, bool] = field(default_factory=dict)  # by name: holding the tensors would keep them alive (a
    # weight fully_shard replaced by its shard, a layer the user swapped out) and lose nothing by their names


class Group(nn.Module):
    """The components of the shared set or of one task: bound modules per point, shared modules."""

    def __init__(self) -> None:
        super().__init__()
        self.points = nn.ModuleDict()  # point key -> ModuleList in stack order
        self.common = nn.ModuleDict()  # index -> module shared by all points of one component


HALF = (torch.float16, torch.bfloat16)


def _placement(point: Point) -> tuple[torch.device, torch.dtype]:
    """Where components at `point` live: on its module's device, in its dtype, but float32 on a
    half-precision base (as PEFT: updates trained in float16 overflow; the ops compute them in float32).
    Integer parameters (a quantized layer's packed weight beside an adapter) give the device only."""
    params = list(point.module.parameters())
    ref = next((p for p in params if p.is_floating_point()), None)
    if ref is None:
        return (params[0].device if params else torch.device("cpu")), torch.float32
    return ref.device, torch.float32 if ref.dtype in HALF else ref.dtype


class Adaptation(nn.Module):
    def __init__(self, model: nn.Module, specs: Specs, active: str | None = None) -> None:
        super().__init__()
        object.__setattr__(self, "model", model)  # not a submodule: the model owns us
        self.specs = specs
        self.task_names = [g for g in specs if g is not None]
        for name in self.task_names:
            if not isinstance(name, str) or not _TASK_NAME.match(name):
                raise ConfigError(f"task names are letters, digits, '_' and '-'; got {name!r}")
        if active is None and self.task_names:
            active = self.task_names[0]
        self._task = None
        self._condition: Condition | None = None  # inside condition(): its latent
        self._route: Route | None = None  # inside route(): its route (use()'s task stays in _task)
        self._enabled = True
        self._installed = False
        self._detached = False
        self.hooks: dict[tuple, Hook] = {}
        self.merge_errors: dict[str, tuple[float, float]] = {}  # the last merge()'s requantization errors
        self.shared = Group()
        self.tasks = nn.ModuleDict({name: Group() for name in self.task_names})
        self.sites = SiteMap(model)
        for group, spec in specs.items():
            self._build(group, spec)
        self._set_task(active)

    # ---- building -------------------------------------------------------------------------------

    def group(self, name: str | None) -> Group:
        return self.shared if name is None else self.tasks[name]

    def _build(self, group: str | None, spec: Spec) -> None:
        target = self.group(group)
        for selector, stack in spec.items():
            for component in stack:
                points = self.sites.resolve(selector, component.kind, repr(component))
                for point in points:
                    check_quantized(point, repr(component))
                ctx = SharedContext(group, points, self.task_names, self.sites, list(target.common.values()))
                shared = component.shared(ctx)
                # a component may return a module it already registered in this group, to reuse it
                if shared is not None and all(m is not shared for m in target.common.values()):
                    target.common[str(len(target.common))] = shared.to(*_placement(points[0]))
                for point in points:
                    bound = component.bind(point, shared).to(*_placement(point))
                    if point.key not in target.points:
                        target.points[point.key] = nn.ModuleList()
                    target.points[point.key].append(bound)
                    if point.place not in self.hooks:
                        self.hooks[point.place] = hook_class(point)(self, point)
                    self.hooks[point.place].add(Binding(group, point, bound))

    def install(self) -> None:
        """Freeze the base, register on the model, install every hook; undo all on failure."""
        model = self.model
        if "adaptune" in model._modules or hasattr(model, "adaptune"):
            raise ConfigError("this model already has an adaptation attached; detach it first")
        self._check_unsharded("attach")
        own = {id(p) for p in self.parameters()}
        base = [(name, p) for name, p in model.named_parameters() if id(p) not in own]
        self._frozen = _Frozen({name: p.requires_grad for name, p in base})
        installed: list[Hook] = []
        try:
            for _, p in base:
                p.requires_grad_(False)
            self.train(model.training)  # components follow the model's mode (LoRA dropout off in eval)
            self._held = keep_differentiable(model)  # gradients through every quantized layer, in any mode
            model.add_module("adaptune", self)
            for hook in self.hooks.values():
                hook.install()
                installed.append(hook)
        except BaseException:
            for hook in reversed(installed):
                hook.remove()
            self._restore(model)
            raise
        self._installed = True

    def _check_unsharded(self, action: str) -> None:
        if fsdp_modules(self.model):
            raise ConfigError(f"cannot {action} on a model already sharded by fully_shard: FSDP would neither shard the "
                              f"new components nor reduce their gradients across the ranks, which would drift apart; "
                              f"attach (or load) before fully_shard")

    def _restore(self, model: nn.Module) -> None:
        for name, flag in self._frozen.flags.items():
            model.get_parameter(name).requires_grad_(flag)
        release(getattr(self, "_held", {}))
        if model._modules.get("adaptune") is self:
            del model._modules["adaptune"]

    def detach(self) -> nn.Module:
        """Unmerge, remove every hook, unfreeze: the model is back to its original, bit-exact.
        A detached adaptation is spent: detach() again returns the model, every other method raises."""
        if not self._installed:
            return self.model
        if self.merged:
            self.unmerge()
        for hook in reversed(list(self.hooks.values())):
            hook.remove()
        self._restore(self.model)
        self._installed, self._detached = False, True
        return self.model

    def _check_attached(self) -> None:
        if self._detached:
            raise AdaptuneError("this adaptation was detached from its model; attach(model, ...) or "
                                "load(model, path) again for a new one")

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        """The identity: the adaptation acts through hooks, and a container that calls every child
        (nn.Sequential) passes its input through unchanged."""
        return x

    # ---- tasks ----------------------------------------------------------------------------------

    @property
    def task(self) -> str | None:
        """The active task set by use() (None: shared components only); a route() leaves it as it is."""
        return self._task

    @property
    def running_task(self) -> str | None:
        """The task forwards run now: the active task, or inside route() the route's one group (None inside a
        route that mixes groups: each sample's, see `routing`)."""
        route = self._route
        if route is None:
            return self._task
        return None if route.mixed else route.group(route.present[0])

    @property
    def enabled(self) -> bool:
        return self._enabled

    def is_active(self, group: str | None) -> bool:
        """Whether `group`'s components run now: the shared ones (None) always, for every sample (routed or
        not); a task's while it is the running task, or inside a mixed route while some sample has it."""
        if not self._enabled:
            return False
        if group is None:
            return True
        route = self.routing
        return group in route.groups if route is not None else group == self.running_task

    def _check_task(self, name: str | None) -> None:
        if name is not None and not isinstance(name, str):
            raise TaskError(f"a task is named by a string (or None: shared components only), got "
                            f"{type(name).__name__}: {name!r}")
        if name is not None and name not in self.tasks:
            valid = ", ".join(map(repr, self.task_names)) or "none (this adaptation has no tasks)"
            raise TaskError(f"unknown task {name!r}; tasks: {valid}")

    def _set_task(self, name: str | None) -> None:
        self._check_task(name)
        self._task = name

    def _check_unmerged(self, action: str) -> None:
        if self.merged:
            raise MergeError(f"cannot {action} while updates are merged into the base weights; call unmerge() first")

    def use(self, task: str | None) -> "Adaptation":
        """Make `task` the active task (None: shared components only)."""
        self._check_attached()
        if self._route is not None:
            raise TaskError("cannot switch tasks inside route(): the route names each sample's task")
        self._check_task(task)
        if task != self._task:
            self._check_unmerged("switch tasks")
        self._set_task(task)
        return self

    @contextmanager
    def using(self, task: str | None) -> Iterator["Adaptation"]:
        """Temporarily make `task` active."""
        previous = self._task
        self.use(task)
        try:
            yield self
        finally:
            self.use(previous)

    def enable(self, on: bool = True) -> "Adaptation":
        self._check_attached()
        if on != self._enabled:
            self._check_unmerged("enable or disable components")
        self._enabled = on
        return self

    def disable(self) -> "Adaptation":
        """Run the base model: every component off."""
        return self.enable(False)

    @contextmanager
    def disabled(self) -> Iterator["Adaptation"]:
        previous = self._enabled
        self.enable(False)
        try:
            yield self
        finally:
            self.enable(previous)

    def add_task(self, name: str, spec: Spec, state: dict[str, torch.Tensor] | None = None) -> Group:
        """Build the task `name` from `spec` (selector -> component or stack) on the attached model, as attach
        builds tasks, installing a hook at any new place; `state` (optional) gives the new group's parameters
        (every name of its state_dict). Returns its Group. All or nothing: on any error nothing changes."""
        self._check_attached()
        if not isinstance(name, str) or not _TASK_NAME.match(name):
            raise ConfigError(f"task names are letters, digits, '_' and '-'; got {name!r}")
        if name in self.tasks:
            raise TaskError(f"task {name!r} exists; give the new task another name")
        if self._route is not None:
            raise TaskError("cannot add a task inside route(); add it outside the route() block")
        self._check_unmerged("add a task")
        self._check_unsharded("add a task")
        conditioned = [m for m in self.shared.common.values() if isinstance(m, HyperNetwork) and m.task_names]
        if conditioned:
            raise ConfigError(f"cannot add a task: the shared {conditioned[0].component!r} embeds each task named at "
                              f"attach and has no embedding for a new one")
        if not isinstance(spec, Mapping) or not spec:
            raise ConfigError(f"a task's spec maps selectors to components, e.g. {{'attn': LoRA(8)}}; got {spec!r}")
        spec = {selector: Stack(stack) for selector, stack in spec.items()}
        if not all(spec.values()):
            raise ConfigError(f"task {name!r} has an empty stack; give each selector at least one component")
        hooks, counts = dict(self.hooks), {place: len(hook.bindings) for place, hook in self.hooks.items()}
        installed: list[Hook] = []
        self.task_names.append(name)
        self.specs[name], self.tasks[name] = spec, Group()
        try:
            self._build(name, spec)
            self.tasks[name].train(self.training)
            for place, hook in self.hooks.items():
                if place not in hooks and self._installed:
                    hook.install()
                    installed.append(hook)
            if state is not None:
                self._load_group(name, state)
        except BaseException:
            for hook in reversed(installed):
                hook.remove()
            for place in [p for p in self.hooks if p not in hooks]:
                del self.hooks[place]
            for place, n in counts.items():
                del self.hooks[place].bindings[n:]
            del self.tasks[name], self.specs[name]
            self.task_names.remove(name)
            raise
        return self.tasks[name]

    def _load_group(self, name: str, state: dict[str, torch.Tensor]) -> None:
        check_state(self.tasks[name].state_dict(), state, f"the state given for task {name!r}", "its components",
                    ConfigError)
        self.tasks[name].load_state_dict(state, strict=True)

    # ---- routing: a task per sample ---------------------------------------------------------------

    @property
    def routing(self) -> Route | None:
        """The route of the current forward when its samples belong to more than one group, else None
        (inside route() with one group, that group is simply the running task)."""
        route = self._route
        return route if route is not None and route.mixed else None

    @contextmanager
    def route(self, tasks: Any) -> Iterator["Adaptation"]:
        """Run forwards (and generate) inside the block with a task per sample: `tasks` is a list of task
        names (None: shared components only) or a (B,) integer tensor of indices into `task_names` (-1:
        shared only). Every sample runs the shared components and its task's, as if alone under
        use(task); gradients reach exactly each sample's components. Every forward's batch must have one
        row per task (generate's beams and returned sequences repeat them); `task` stays use()'s."""
        self._check_attached()
        if self._route is not None:
            raise TaskError("route() is already active; routes do not nest")
        ref = next(self.model.parameters(), None)
        index = route_index(tasks, self.task_names, ref.device if ref is not None else "cpu")
        if self.merged:
            raise MergeError("cannot route samples to tasks while updates are merged into the base weights "
                             "(they would apply to every sample); call unmerge() first")
        route = Route(index, self.task_names)
        with checked(self.model, route):
            self._route = route
            try:
                yield self
            finally:
                self._route = None

    # ---- conditioning ---------------------------------------------------------------------------

    @property
    def latent(self) -> torch.Tensor | None:
        """The per-sample latent (B, d_z) that conditioned components (PSA, AtM) read; None outside condition()."""
        return self._condition.latent if self._condition is not None else None

    @property
    def context(self) -> Context:
        """What a forward runs now, as components read it: the running task, a mixed route, the latent."""
        return Context(self.running_task, self.routing, self.latent)

    @property
    def conditioning(self) -> Condition | None:
        """condition()'s latent with the batches it fits (one row per sample; generate() may repeat them)."""
        return self._condition

    @contextmanager
    def condition(self, latent: torch.Tensor) -> Iterator["Adaptation"]:
        """Run forwards (and generate) inside the block conditioned on `latent` (B, d_z): one row per sample of
        every batch, or inside the model's generate() rows that its repeated samples (beams, several
        sequences) divide; any other batch is a ConfigError."""
        self._check_attached()
        if not isinstance(latent, torch.Tensor) or latent.dim() != 2 or not latent.is_floating_point():
            shape = tuple(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
            raise ConfigError(f"condition() takes a float tensor (batch, latent_dim), got {shape}")
        if not torch.isfinite(latent).all():
            raise ConfigError("condition() got a latent with NaN or inf entries")
        if latent.shape[0] < 1:
            raise ConfigError("condition() got a latent with no rows; give one row per sample")
        previous, current = self._condition, Condition(latent)
        with checked(self.model, current, "condition()"):  # as route(): each batch checked, generate() repeats
            self._condition = current
            try:
                yield self
            finally:
                self._condition = previous

    # ---- merging --------------------------------------------------------------------------------

    @property
    def merged(self) -> bool:
        return any(hook.merged for hook in self.hooks.values())

    def merge(self) -> "Adaptation":
        """Fold the active LoRA/DoRA updates into the base weights (exactly undone by unmerge). A quantized
        weight is dequantized, updated and requantized: `merge_errors` and a warning give the error that adds."""
        self._check_attached()
        if fsdp_modules(self.model):
            raise MergeError("cannot merge a model sharded by fully_shard: each rank holds only shards of the base "
                             "weights. Save the adapter (adaptation.save(path), on every rank), then in one process "
                             "load(model, path) onto the unsharded base and merge() there; or export_peft(model, "
                             "directory) and merge with PEFT")
        if self._route is not None:
            raise MergeError("cannot merge inside route(): a merged update would apply to every sample of the "
                             "batch; merge outside the route() block")
        ready = [(hook, hook.mergeable()) for hook in self.hooks.values()]  # all checked before any change
        self.merge_errors = {where: e for hook, bindings in ready for where, e in hook.merge(bindings).items()}
        if self.merge_errors:
            where, (most, relative) = max(self.merge_errors.items(), key=lambda item: item[1][1])
            warnings.warn(f"merge() requantized {len(self.merge_errors)} quantized weight(s), which changes them "
                          f"beyond the update: at most |ΔW| = {most:.3g}, relative {relative:.3g} (at {where}); "
                          f"adaptation.merge_errors holds (max |ΔW|, ‖ΔW‖ / ‖W‖) per layer, unmerge() restores "
                          f"the original storage bit for bit", RuntimeWarning, stacklevel=2)
        return self

    def unmerge(self) -> "Adaptation":
        """Restore the base weights saved by merge(), bit-exact."""
        self._check_attached()
        for hook in self.hooks.values():
            hook.unmerge()
        return self

    # ---- bindings -------------------------------------------------------------------------------

    def bindings(self, groups: Iterable[str | None] | None = None, kind: str | None = None) -> Iterator[Binding]:
        """Every component module bound to the model, hook by hook in build order; `groups` keeps those of
        the given groups (None: the shared set, else task names), `kind` those at points of one kind."""
        self._check_attached()
        if groups is not None:
            groups = set(groups)
            for name in groups - {None}:
                self._check_task(name)  # now, not at the first next()
        return (b for hook in self.hooks.values() for b in hook.bindings
                if (groups is None or b.group in groups) and (kind is None or b.point.kind == kind))

    # ---- persistence and accounting -------------------------------------------------------------

    def save(self, path: Any) -> Any:
        """Save the components to one .safetensors file (see adaptune.save_format); returns its path."""
        self._check_attached()
        return write_saved(self, path)

    def save_sharded(self, directory: Any) -> Any:
        """Save the components as a torch.distributed.checkpoint directory, each rank its own shards without
        gathering (under FSDP2 every rank calls it); load_sharded reads it back on any number of ranks."""
        self._check_attached()
        return write_sharded(self, directory)

    def load_sharded(self, directory: Any) -> "Adaptation":
        """Load a save_sharded directory into these components (the same stacks) and make its task active."""
        self._check_attached()
        self._check_unmerged("load a checkpoint")
        read_sharded(self, directory)
        return self

    def counts(self) -> Counts:
        """Parameter counts: base, shared, per task (see adaptune.accounting)."""
        self._check_attached()
        return count(self)

    # ---- reporting ------------------------------------------------------------------------------

    def spec(self) -> dict[str, Any]:
        """The composition as JSON-able data: shared and per-task stacks by selector."""
        def dump(spec: Spec) -> dict[str, Any]:
            return {sel: stack.to_dict() for sel, stack in spec.items()}
        return {"shared": dump(self.specs.get(None, {})),
                "tasks": {name: dump(self.specs[name]) for name in self.task_names}}

    def extra_repr(self) -> str:
        lines = [f"{sel}: {stack!r}" for sel, stack in self.specs.get(None, {}).items()]
        for name in self.task_names:
            lines += [f"[{name}] {sel}: {stack!r}" for sel, stack in self.specs[name].items()]
        lines.append(f"active task: {self._task!r}, enabled: {self._enabled}, merged: {self.merged}")
        return "\n".join(lines)


def adaptation_of(model: nn.Module | Adaptation) -> Adaptation:
    """`model`'s adaptation (or the adaptation itself); AdaptuneError when none is attached."""
    if isinstance(model, Adaptation):
        return model
    found = getattr(model, "adaptune", None)
    if not isinstance(found, Adaptation):
        raise AdaptuneError("this model has no adaptation attached; call attach(model, ...) first")
    return found
