"""The fine-tuning methods an experiment compares: what is attached and what trains (multitask/heads.py counts
it), and the AdamW parameter groups (param_groups).

| method        | what trains                                                        | default sharing |
|---------------|--------------------------------------------------------------------|-----------------|
| head-only     | the per-task heads only (the base is frozen; seed 004's "Pretrain") | -               |
| full          | every base parameter, shared by all tasks, and the heads            | shared          |
| lora, dora    | LoRA/DoRA(r) on attn (q, k, v)                                     | shared          |
| adapter       | Adapter(dim) after attn and after ffn (Houlsby)                    | per task        |
| lora+adapter  | shared LoRA(r) on attn + per-task Adapter(dim) on attn and ffn      | mixed           |
| hyper         | HyperAdapter(dim) on attn and ffn: one hypernetwork, task embeddings| shared          |
| prefix        | Prefix(n) on attn                                                  | shared          |
| prompt        | PromptTuning(n) on embed                                           | shared          |
| spec          | any composition, e.g. "attn=LoRA(12)|Prefix(10); ffn=Adapter(64)"   | shared          |

Sharing follows seed 004 (adapters are task-specific, LoRA and the hypernetwork are shared);
`per_task=True/False` overrides it for everything the method attaches (lora+adapter included).
Every method also trains one plain nn.Linear head per task.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from ...errors import ConfigError

if TYPE_CHECKING:  # imported where used: the CLI builds its options from Method without importing torch
    from torch import nn

    from ...adaptation import Adaptation

METHODS = ("head-only", "full", "lora", "dora", "adapter", "lora+adapter", "hyper", "prefix", "prompt", "spec")
COMPONENT_LR = 3e-3  # the learning rate of every method DEFAULT_LR does not name (see the README: the comparisons)
DEFAULT_LR = {"full": 3e-4, "prefix": 5e-3, "prompt": 1e-2}
PER_TASK_BY_DEFAULT = {"adapter"}


RENAMED = {"stack": "spec"}  # the method and its field were named 'stack' before the option became --spec


def method_fields(saved: dict) -> dict:
    """Method's fields of a saved method (config.method of a results.json), of runs saved before the rename
    too: their field `stack` is `spec`, their method 'stack' is 'spec'."""
    fields = {RENAMED.get(k, k): v for k, v in saved.items()}
    if fields.get("name") in RENAMED:
        fields["name"] = RENAMED[fields["name"]]
    return fields


def method_label(saved: str) -> str:
    """A saved Method.label() as this version writes it: 'stack[...]' of runs saved before the rename is
    'spec[...]'."""
    for old, new in RENAMED.items():
        if saved.startswith(f"{old}["):
            return f"{new}[{saved[len(old) + 1:]}"
    return saved


def lr_defaults() -> str:
    """The default learning rates in words: 'full 0.0001, prefix 0.005, prompt 0.01, others 0.001'."""
    return ", ".join([f"{name} {lr:g}" for name, lr in DEFAULT_LR.items()] + [f"others {COMPONENT_LR:g}"])


@dataclass(frozen=True)
class Method:
    """What an experiment attaches and trains; the field metadata is the help of the CLI's options."""
    name: str | None = field(default=None, metadata={
        "help": f"one of {', '.join(METHODS)} (default lora+adapter; spec when --spec is given)",
        "flags": ("--method",)})
    r: int = field(default=12, metadata={"help": "LoRA/DoRA rank (lora, dora, lora+adapter)"})
    dim: int = field(default=64, metadata={"help": "adapter / hyper-adapter bottleneck (adapter, lora+adapter, hyper)"})
    n: int = field(default=20, metadata={"help": "prefix / prompt length (prefix, prompt)"})
    spec: str | None = field(default=None, metadata={
        "help": "any composition, e.g. 'attn=LoRA(12)|Prefix(10); ffn=Adapter(64)' (method 'spec'; "
                "--spec alone selects it, with another --method it is refused)"})
    per_task: bool | None = field(default=None, metadata={
        "help": "per-task or shared components (default: the method's, as seed 004)",
        "flags": ("--per-task/--shared",)})

    default: ClassVar[str] = "lora+adapter"  # the method when neither name nor spec is given

    def __post_init__(self) -> None:
        if self.name is None:  # --spec alone selects method 'spec'
            object.__setattr__(self, "name", "spec" if self.spec is not None else self.default)
        if self.name not in METHODS:
            raise ConfigError(f"unknown method {self.name!r}; known: {', '.join(METHODS)}")
        for what in ("r", "dim", "n"):
            value = getattr(self, what)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{what} (--{what}) must be an integer of at least 1, got {value!r}")
        if self.spec is not None and self.name != "spec":
            raise ConfigError(f"--spec gives the composition of method 'spec'; drop --method {self.name} or --spec")
        if self.name == "spec":
            self._check_spec()
        if self.name in ("head-only", "full") and self.per_task is not None:
            raise ConfigError(f"--per-task/--shared does not apply to {self.name!r}")

    def _check_spec(self) -> None:
        """The composition parsed now, so a bad one is refused before anything loads."""
        example = "e.g. --spec 'attn=LoRA(12)|Prefix(10); ffn=Adapter(64)'"
        if self.spec is None or (isinstance(self.spec, str) and not self.spec.strip()):
            raise ConfigError(f"method 'spec' needs a composition, {example}")
        from ...spec import parse_spec

        try:
            parse_spec(self.spec)
        except ConfigError as e:
            raise ConfigError(f"--spec {self.spec!r}: {e}") from e

    @property
    def sharing(self) -> str:
        if self.name in ("head-only", "full"):
            return "shared" if self.name == "full" else "-"
        if self.name == "lora+adapter" and self.per_task is None:
            return "shared LoRA, per-task adapters"
        per = self.per_task if self.per_task is not None else self.name in PER_TASK_BY_DEFAULT
        return "per task" if per else "shared"

    @property
    def default_lr(self) -> float:
        return DEFAULT_LR.get(self.name, COMPONENT_LR)

    def label(self) -> str:
        arg = {"lora": f"r={self.r}", "dora": f"r={self.r}", "adapter": f"dim={self.dim}", "hyper": f"dim={self.dim}",
               "lora+adapter": f"r={self.r}, dim={self.dim}", "prefix": f"n={self.n}", "prompt": f"n={self.n}",
               "spec": self.spec}.get(self.name)
        return f"{self.name}[{arg}]" if arg else self.name

    def components(self) -> dict:
        """The spec attached for each task (or shared): selector -> stack."""
        from ... import Adapter, DoRA, HyperAdapter, LoRA, Prefix, PromptTuning
        from ...spec import parse_spec

        both = lambda c: {"attn": c, "ffn": c}  # noqa: E731
        return {"lora": lambda: {"attn": LoRA(self.r)}, "dora": lambda: {"attn": DoRA(self.r)},
                "adapter": lambda: both(Adapter(self.dim)), "hyper": lambda: both(HyperAdapter(self.dim)),
                "lora+adapter": lambda: {"attn": LoRA(self.r) | Adapter(self.dim), "ffn": Adapter(self.dim)},
                "prefix": lambda: {"attn": Prefix(self.n)}, "prompt": lambda: {"embed": PromptTuning(self.n)},
                "spec": lambda: parse_spec(self.spec or "")}[self.name]()

    def prepare(self, model: nn.Module, tasks: list[str]) -> Adaptation | None:
        """Freeze/unfreeze the base and attach components; returns the Adaptation (None: no components)."""
        from ... import Adapter, LoRA, attach

        if self.name in ("head-only", "full"):
            for p in model.parameters():
                p.requires_grad_(self.name == "full")
            return None
        if self.name == "lora+adapter" and self.per_task is None:  # seed 004: shared LoRA, per-task adapters
            return attach(model, {"attn": LoRA(self.r)},
                          tasks={t: {"attn": Adapter(self.dim), "ffn": Adapter(self.dim)} for t in tasks})
        if self.sharing == "per task":
            return attach(model, tasks={t: self.components() for t in tasks})
        return attach(model, self.components(), tasks={t: {} for t in tasks})  # empty task sets: hyper's task embeddings


_COMPONENT_LAYER = re.compile(r"layers:(\d+):")
_BASE_LAYER = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.")
_EMBED = re.compile(r"(?:^|\.)(?:embeddings|wte|wpe|embed_tokens)\.|points\.embed\.")


def depth(name: str) -> int | None:
    """Layer index of a parameter (-1: embeddings, None: above the layers or shared across them)."""
    m = _COMPONENT_LAYER.search(name) or _BASE_LAYER.search(name)
    if m:
        return int(m[1])
    return -1 if _EMBED.search(name) else None


def param_groups(model: nn.Module, heads: nn.Module, lr: float, head_lr: float, n_layers: int,
                 decay: float | None = None) -> list[dict]:
    """AdamW groups. With layer-wise decay ξ (seed 003): layer l gets lr·ξ^(L-1-l), embeddings lr·ξ^L,
    parameters above the layers or shared across layers (pooler, hypernetwork) lr; heads get head_lr."""
    if decay is not None and not 0.0 < decay <= 1.0:
        raise ConfigError(f"layer-wise learning-rate decay must be in (0, 1], got {decay}")
    by_lr: dict[float, list] = defaultdict(list)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        d = depth(name)
        scale = 1.0 if decay is None or d is None else decay ** (n_layers - 1 - d)
        by_lr[lr * scale].append(p)
    groups = [{"params": ps, "lr": g} for g, ps in sorted(by_lr.items(), reverse=True)]
    groups.append({"params": list(heads.parameters()), "lr": head_lr})
    return groups
