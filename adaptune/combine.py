"""combine: a new task built from existing tasks' components (task arithmetic, model soups, TIES, DARE).

`combine(adaptation, {"sst": 0.5, "sts": 0.5}, "linear", into="soup")` adds the task "soup", which then
works as any task does (use, route, merge, save / load, export_peft). The rules are Hugging Face PEFT's
`add_weighted_adapter` (peft/tuners/lora/model.py, peft/utils/merge_utils.py) on every LoRA, with weights
w_t and the tasks' scales s_t; the new LoRA has scale 1. ΔW_t = s_t·B_t·A_t, the whole update of task t
(PiSSA / OLoRA included: its factors are `update()`'s, of rank 2r).

| method           | new factors                                                           | rank      |
|------------------|-----------------------------------------------------------------------|-----------|
| linear           | A = Σ σ_t·√|w_t·s_t|·A_t,  B = Σ √|w_t·s_t|·B_t  (σ_t = sign(w_t·s_t))  | r (equal) |
| cat              | A = [w_1·s_1·A_1; w_2·s_2·A_2; ...],  B = [B_1, B_2, ...]               | Σ r_t     |
| svd              | B·A = the top-`rank` SVD of Σ w_t·ΔW_t (B = U·S, A = Vᵀ), `clamp`-ed    | rank      |
| ties             | on A's and B's with linear's weights: keep each tensor's top `density` | r (equal) |
|                  | entries by |value|, elect a sign per entry from the kept, unweighted    |           |
|                  | entries (Σ values: "total", Σ signs: "frequency"), then average the    |           |
|                  | weighted entries of that sign                                         |           |
| dare_linear      | drop entries at random (keep with probability `density`), rescale the | r (equal) |
|                  | rest by 1/density, then linear                                        |           |
| dare_ties        | dare's drop and rescale, then ties' election and average               | r (equal) |
| magnitude_prune  | ties' top-`density` pruning, then linear                              | r (equal) |
| <method>_svd     | the method on the ΔW_t (weights w_t), then svd's truncation            | rank      |

`rank` defaults to the largest r_t; `clamp` (a quantile in (0, 1]) clamps U·S and Vᵀ to ±the quantile of
their entries, as PEFT's svd_clamp. Random drops draw as PEFT's do: in the model's module order, A's before B's,
each ΔW_t in the layout its module stores (an embedding table's and a Conv1D's: (in, out)); `seed=s` (or a
torch.Generator) draws what PEFT draws from the global RNG seeded with s as its merging starts (after its new
layers' initial values); neither: the global RNG.
Two differences from PEFT: one task is combined by the method asked (PEFT falls back to linear), and the
SVD is the reduced one (PEFT's default full SVD truncates the same, up to the signs of singular pairs, which
clamp's quantile sees: PEFT's svd_full_matrices=False gives the same factors).

DoRA: the factors as LoRA; the magnitude m = ‖W_i‖ + Σ w_t·(m_t − ‖W_i‖) for every method (task arithmetic
on what each task learned; PEFT keeps its new layer's initial magnitude, ‖W_i‖ with the default init).
Adapter: "linear" only, every parameter Σ w_t·θ_t (a weight-space soup); the tasks' adapters must agree in
dim, activation, placement and scale. Other components are refused.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Mapping

import torch
from torch import Tensor

from .adaptation import Adaptation, Spec, adaptation_of
from .components.adapter import Adapter, AdapterModule
from .components.base import Stack
from .components.dora import DoRA, DoRAModule
from .components.lora import LoRA
from .errors import ConfigError, MergeError, TaskError
from .points import EXPERTS, Conv1D, is_table, linear_weight
from .quantized import row_norm_sq

METHODS = ("linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_linear_svd", "dare_ties",
           "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
KINDS = (LoRA, DoRA, Adapter)  # the components combine() handles
OPTIONS = {  # each rule's options, besides rank and clamp of the *_svd methods
    "ties": {"density", "majority_sign_method"}, "magnitude_prune": {"density"},
    "dare_linear": {"density", "seed", "generator"}, "dare_ties": {"density", "majority_sign_method", "seed", "generator"}}


# ---- the math: PEFT's merge_utils on same-shape tensors ---------------------------------------------

def mix(tensors: list[Tensor], weights: list[float], rule: str, density: float = 1.0, sign: str = "total",
        generator: torch.Generator | None = None) -> Tensor:
    """Σ w_t·T_t under `rule` ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"; table above)."""
    if rule in ("ties", "magnitude_prune"):
        tensors = [_top(t, density) for t in tensors]
    elif rule.startswith("dare"):
        tensors = [_drop(t, density, generator) for t in tensors]
    stacked = torch.stack(tensors)  # (T, ...)
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).view(-1, *[1] * (stacked.dim() - 1))
    if rule not in ("ties", "dare_ties"):
        return (stacked * w).sum(0)
    votes = stacked.sum(0) if sign == "total" else stacked.sign().sum(0)
    agree = stacked.sign() == torch.where(votes >= 0, 1, -1)  # (T, ...) the entries with the elected sign
    return (stacked * w * agree).sum(0) / torch.clamp(agree.sum(0), min=1.0)


def _top(t: Tensor, density: float) -> Tensor:
    """t with all but its int(density·numel) largest entries by |value| zeroed (density 1: t)."""
    if density >= 1:
        return t
    mask = torch.zeros_like(t).reshape(-1)
    mask[torch.topk(t.abs().reshape(-1), k=int(density * t.numel()), largest=True)[1]] = 1
    return t * mask.reshape(t.shape)


def _drop(t: Tensor, density: float, generator: torch.Generator | None) -> Tensor:
    """t with each entry kept with probability `density` and rescaled by 1 / density (density 1: t)."""
    if density >= 1:
        return t
    if generator is None:
        mask = torch.bernoulli(torch.full_like(t, density))
    else:
        p = torch.full(t.shape, density, dtype=t.dtype, device=generator.device)
        mask = torch.bernoulli(p, generator=generator).to(t.device)
    return t * mask / density


def low_rank(factors: list[tuple[Tensor, Tensor]], scales: list[float], weights: list[float], method: str,
             opts: dict, transposed: bool = False) -> tuple[Tensor, Tensor]:
    """The new (A (r, in), B (out, r)), scale 1, from the tasks' (A_t, B_t) with scales s_t (of equal ranks but for
    cat and *svd); `transposed`: the module stores its weight (in, out), the layout the *_svd methods prune ΔW_t in."""
    rule = method.removesuffix("_svd")
    if method == "cat":
        return (torch.cat([A * w * s for (A, _), w, s in zip(factors, weights, scales)]),
                torch.cat([B for _, B in factors], dim=1))
    if method.endswith("svd"):
        deltas = [((B @ A) * s).mT if transposed else (B @ A) * s for (A, B), s in zip(factors, scales)]
        delta = mix(deltas, weights, "linear" if method == "svd" else rule, **opts["mix"])
        delta = delta.mT if transposed else delta  # (out, in)
        return _truncate(delta, opts["rank"] or max(A.shape[0] for A, _ in factors), opts["clamp"])
    root = [math.sqrt(abs(w * s)) for w, s in zip(weights, scales)]
    signed = [r if w * s >= 0 else -r for r, w, s in zip(root, weights, scales)]  # the sign on A only
    return (mix([A for A, _ in factors], signed, rule, **opts["mix"]),
            mix([B for _, B in factors], root, rule, **opts["mix"]))


def _truncate(delta: Tensor, rank: int, clamp: float | None) -> tuple[Tensor, Tensor]:
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)  # (out, k), (k,), (k, in)
    U, Vh = U[:, :rank] @ torch.diag(S[:rank]), Vh[:rank]
    if clamp is not None:
        hi = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), clamp)
        U, Vh = U.clamp(-hi, hi), Vh.clamp(-hi, hi)
    return Vh, U


# ---- combine ---------------------------------------------------------------------------------------

def combine(model: torch.nn.Module | Adaptation, weights: Mapping[str, float], method: str = "linear", *,
            into: str, rank: int | None = None, clamp: float | None = None, density: float | None = None,
            majority_sign_method: str | None = None, seed: int | None = None,
            generator: torch.Generator | None = None) -> Adaptation:
    """Add the task `into`, `method` (table above) of the tasks weighted by `weights` ({task: w}, w < 0
    negates); returns the adaptation. The tasks need the same component types at the same sites. Options:
    rank, clamp (*svd); density (ties, dare_*, magnitude_prune*); majority_sign_method "total" | "frequency"
    (ties*, dare_ties*); seed or generator (dare_*). All or nothing: on any error the adaptation is unchanged."""
    adaptation = adaptation_of(model)
    opts = _options(method, rank, clamp, density, majority_sign_method, seed, generator)
    names, w = _weights(adaptation, weights)
    if not isinstance(into, str):
        raise ConfigError(f"into names the new task, a string; got {into!r}")
    if into in adaptation.tasks:
        raise TaskError(f"into={into!r}: give the new task a name no task has (tasks: {adaptation.task_names})")
    if adaptation.merged:
        raise MergeError("cannot combine while updates are merged into the base weights; call unmerge() first")
    _check_kinds(adaptation, names, method)
    slots = _slots(adaptation, names)
    order = {id(m): i for i, m in enumerate(adaptation.model.modules())}  # PEFT's order of draws
    state, ranks = {}, {}
    with torch.no_grad():
        for key, j in sorted(slots, key=lambda s: (order[id(slots[s][0].module)], slots[s][0].out_rows.start, s[1])):
            point, modules = slots[key, j]
            values = _slot(point, modules, w, method, opts)
            ranks[key, j] = values["A"].shape[0] if "A" in values else None
            state.update({f"points.{key}.{j}.{name}": t for name, t in values.items()})
    adaptation.add_task(into, _spec(adaptation, names[0], ranks), state)
    return adaptation


def _options(method, rank, clamp, density, sign, seed, generator) -> dict:
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; methods: {', '.join(METHODS)}")
    allowed = ({"rank", "clamp"} if method.endswith("svd") else set()) | OPTIONS.get(method.removesuffix("_svd"), set())
    given = dict(rank=rank, clamp=clamp, density=density, majority_sign_method=sign, seed=seed, generator=generator)
    extra = sorted(k for k, v in given.items() if v is not None and k not in allowed)
    if extra:
        raise ConfigError(f"method {method!r} takes {', '.join(sorted(allowed)) or 'no options'}; got {', '.join(extra)}")
    if "density" in allowed and not (_number(density) and 0 < density <= 1):
        raise ConfigError(f"method {method!r} needs density, the fraction of entries kept, in (0, 1]; got {density!r}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise ConfigError(f"rank must be a positive integer, got {rank!r}")
    if clamp is not None and not (_number(clamp) and 0 < clamp <= 1):
        raise ConfigError(f"clamp is a quantile in (0, 1], got {clamp!r}")
    if sign not in (None, "total", "frequency"):
        raise ConfigError(f"majority_sign_method must be 'total' or 'frequency', got {sign!r}")
    if seed is not None and generator is not None:
        raise ConfigError("give seed or generator, not both")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ConfigError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
    return {"rank": rank, "clamp": clamp,
            "mix": {"density": density or 1.0, "sign": sign or "total", "generator": generator}}


def _number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _weights(adaptation: Adaptation, weights: Mapping[str, float]) -> tuple[list[str], list[float]]:
    if not isinstance(weights, Mapping) or not weights:
        raise ConfigError(f"weights map task names to numbers, e.g. {{'sst': 0.5, 'sts': 0.5}}; got {weights!r}")
    for name, w in weights.items():
        if name not in adaptation.tasks:
            raise TaskError(f"unknown task {name!r}; tasks: {', '.join(map(repr, adaptation.task_names)) or 'none'}")
        if not _number(w):
            raise ConfigError(f"the weight of task {name!r} must be a finite number, got {w!r}")
    return list(weights), [float(w) for w in weights.values()]


def _check_kinds(adaptation: Adaptation, names: list[str], method: str) -> None:
    for name in names:
        for selector, stack in adaptation.specs[name].items():
            for c in stack:
                if type(c) not in KINDS:
                    raise ConfigError(f"combine() takes LoRA, DoRA and Adapter components; task {name!r} has "
                                      f"{c!r} on {selector!r}")
                if type(c) is Adapter and method != "linear":
                    raise ConfigError(f"method {method!r} does not apply to Adapter ({c!r} on {selector!r} in task "
                                      f"{name!r}): adapters combine with method 'linear' only")


def _slots(adaptation: Adaptation, names: list[str]) -> dict:
    """{(point key, position): (point, [each task's module there])}; ConfigError at the first difference."""
    layouts = []
    for name in names:
        layout: dict = {}
        for b in adaptation.bindings([name]):
            if b.point.kind == EXPERTS:
                raise ConfigError(f"combine() does not combine expert LoRA yet (task {name!r} at {b.point.where()}); "
                                  f"it combines LoRA, DoRA and Adapter on projections and sublayers")
            layout.setdefault(b.point.key, (b.point, []))[1].append(b.module)
        layouts.append(layout)
    first = layouts[0]
    for name, other in zip(names[1:], layouts[1:]):
        for key in [*first, *(k for k in other if k not in first)]:
            mine, theirs = first.get(key, (None, [])), other.get(key, (None, []))
            kinds = [[type(m).__name__ for m in ms] for ms in (mine[1], theirs[1])]
            if kinds[0] != kinds[1]:
                raise ConfigError(f"tasks {names[0]!r} and {name!r} differ at {(mine[0] or theirs[0]).where()}: "
                                  f"{kinds[0] or 'nothing'} vs {kinds[1] or 'nothing'}; combine() needs the same "
                                  f"components at the same sites")
    return {(key, j): (point, [layout[key][1][j] for layout in layouts])
            for key, (point, modules) in first.items() for j in range(len(modules))}


def _slot(point, modules: list, weights: list[float], method: str, opts: dict) -> dict[str, Tensor]:
    """The new module's parameters at one point."""
    if isinstance(modules[0], AdapterModule):
        if len({(m.parallel, m.act, m.scale, m.down_weight.shape) for m in modules}) > 1:
            raise ConfigError(f"the tasks' adapters at {point.where()} differ in dim, act, placement or scale; "
                              f"linear combines adapters of one shape")
        params = [dict(m.named_parameters()) for m in modules]
        return {n: sum(w * p[n].detach() for w, p in zip(weights, params)) for n in params[0]}
    factors = [tuple(t.detach() for t in m.update()) for m in modules]
    ranks = [A.shape[0] for A, _ in factors]
    if len(set(ranks)) > 1 and method != "cat" and not method.endswith("svd"):
        raise ConfigError(f"method {method!r} needs equal ranks, got {ranks} at {point.where()}; use 'cat', or an "
                          f"svd method with a rank")
    transposed = is_table(point.module) or isinstance(point.module, Conv1D)
    A, B = low_rank(factors, [m.scale for m in modules], weights, method, opts, transposed)
    r, limit = opts["rank"] or A.shape[0], min(point.dim_in, point.dim_out)  # rank: the *_svd methods' option
    if r > limit:
        raise ConfigError(f"method {method!r} gives rank {r} at {point.where()}, larger than the layer "
                          f"({point.dim_out}×{point.dim_in}); use an svd method with rank ≤ {limit}")
    if not isinstance(modules[0], DoRAModule):
        return {"A": A, "B": B}
    norm = row_norm_sq(linear_weight(point.module)[point.out_rows]).sqrt()  # (out,) ‖W_i‖
    return {"A": A, "B": B, "magnitude": norm + sum(w * (m.magnitude.detach() - norm)
                                                    for w, m in zip(weights, modules))}


def _spec(adaptation: Adaptation, first: str, ranks: dict) -> Spec:
    """The first task's spec with each LoRA / DoRA at its new rank (one per selector), scale 1, no PiSSA."""
    spec, seen = {}, {}
    for selector, stack in adaptation.specs[first].items():
        out = []
        for c in stack:
            points = adaptation.sites.resolve(selector, c.kind, repr(c))
            found = set()
            for p in points:
                seen[p.key] = seen.get(p.key, -1) + 1
                found.add(ranks[p.key, seen[p.key]])
            if len(found) > 1:
                raise ConfigError(f"the combined rank differs across the points of {selector!r} ({sorted(found)}); "
                                  f"give the tasks the same selectors there")
            r = found.pop()
            out.append(c if r is None else dataclasses.replace(c, r=r, alpha=None, rslora=False, init="default"))
        spec[selector] = Stack(*out)
    return spec


__all__ = ["METHODS", "combine", "low_rank", "mix"]
