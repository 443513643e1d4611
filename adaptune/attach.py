"""attach / detach: bind components to a model, all or nothing; counts: what they cost."""
from __future__ import annotations

from typing import Mapping

from torch import nn

from .accounting import Counts
from .adaptation import Adaptation, Plan, adaptation_of
from .components.base import Component, Stack
from .errors import ConfigError

Spec = Mapping[str, "Component | Stack"]


def _stacks(spec: Spec | None, where: str) -> dict[str, Stack]:
    if spec is None:
        return {}
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where} must map selectors to components, e.g. {{'attn': LoRA(8)}}; got {spec!r}")
    out = {}
    for selector, stack in spec.items():
        if not isinstance(stack, (Component, Stack)):
            raise ConfigError(f"{where}[{selector!r}] must be a component or a stack (LoRA(8) | Prefix(10)), "
                              f"got {type(stack).__name__}: {stack!r}")
        out[selector] = Stack(stack)
        if not out[selector]:
            raise ConfigError(f"{where}[{selector!r}] is an empty stack; give at least one component")
    return out


def plan_of(spec: Spec | None = None, tasks: Mapping[str, Spec] | None = None) -> Plan:
    """Normalise attach's arguments to {None: shared stacks, task: stacks}."""
    plan: Plan = {None: _stacks(spec, "spec")}
    if tasks is not None:
        if not isinstance(tasks, Mapping) or not tasks:
            raise ConfigError(f"tasks must map task names to specs, e.g. {{'sst': {{'ffn': Adapter(64)}}}}; got {tasks!r}")
        for name, task_spec in tasks.items():
            plan[name] = _stacks(task_spec, f"tasks[{name!r}]")
    if not any(plan.values()):
        raise ConfigError("nothing to attach: give at least one selector and component")
    return plan


def attach(model: nn.Module, spec: Spec | None = None, *, tasks: Mapping[str, Spec] | None = None,
           active: str | None = None) -> Adaptation:
    """Freeze `model` and bind components to its sites; returns the Adaptation (also `model.adaptune`).

    spec:   shared components, `{"attn": LoRA(12) | Prefix(30), "ffn": Adapter(64)}`
    tasks:  per-task components, `{"sst": {"ffn": Adapter(64)}, "sts": {...}}`
    active: the task active at first (default: the first task)
    On any error the model is left unchanged.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"attach needs a torch.nn.Module, got {type(model).__name__}")
    if isinstance(getattr(model, "adaptune", None), Adaptation):
        raise ConfigError("this model already has an adaptation attached; call detach(model) first")
    adaptation = Adaptation(model, plan_of(spec, tasks), active)
    adaptation.install()
    return adaptation


def detach(model: nn.Module | Adaptation) -> nn.Module:
    """Remove every component: the original model, bit-exact."""
    return adaptation_of(model).detach()


def counts(model: nn.Module | Adaptation) -> Counts:
    """Parameter counts of `model`'s adaptation: base, shared, per task (see adaptune.accounting)."""
    return adaptation_of(model).counts()
