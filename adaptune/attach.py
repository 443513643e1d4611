"""attach / detach: bind components to a model, all or nothing; counts: what they cost."""
from __future__ import annotations

from typing import Mapping

from torch import nn

from .accounting import Counts
from .adaptation import Adaptation, Spec, Specs, adaptation_of
from .components.base import Component, Stack
from .errors import ConfigError

UserSpec = Mapping[str, "Component | Stack"]  # a spec as attach takes it: a stack or a single component


def _spec(spec: UserSpec | None, where: str) -> Spec:
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


def specs_of(spec: UserSpec | None = None, tasks: Mapping[str, UserSpec] | None = None) -> Specs:
    """Normalise attach's arguments to {None: the shared spec, task: its spec}."""
    specs: Specs = {None: _spec(spec, "spec")}
    if tasks is not None:
        if not isinstance(tasks, Mapping) or not tasks:
            raise ConfigError(f"tasks must map task names to specs, e.g. {{'sst': {{'ffn': Adapter(64)}}}}; got {tasks!r}")
        for name, task_spec in tasks.items():
            specs[name] = _spec(task_spec, f"tasks[{name!r}]")
    if not any(specs.values()):
        raise ConfigError("nothing to attach: give at least one selector and component")
    return specs


def attach(model: nn.Module, spec: UserSpec | None = None, *, tasks: Mapping[str, UserSpec] | None = None,
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
    adaptation = Adaptation(model, specs_of(spec, tasks), active)
    adaptation.install()
    return adaptation


def detach(model: nn.Module | Adaptation) -> nn.Module:
    """Remove every component: the original model, bit-exact."""
    return adaptation_of(model).detach()


def counts(model: nn.Module | Adaptation) -> Counts:
    """Parameter counts of `model`'s adaptation: base, shared, per task (see adaptune.accounting)."""
    return adaptation_of(model).counts()
