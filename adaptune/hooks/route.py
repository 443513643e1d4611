"""A route: which task each sample of one batch runs (`adaptation.route(tasks)`).

`index` (N,) holds, per sample, the task's position in the adaptation's task names, or -1 for the
shared components only. Hooks read it for the batch they see: the same N samples, or, inside the
model's generate(), N·k rows where it repeats each sample k times (beams, several returned sequences,
as repeat_interleave). Any other batch size is a TaskError, checked at every forward of the model
(`checked`) and at every hook that routes.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from ..errors import TaskError

SHARED = -1  # the index of "shared components only"


def route_index(tasks: Any, names: Sequence[str], device: Any = None) -> Tensor:
    """(N,) long indices into `names` (SHARED: shared only), on the CPU, from a 1-D integer tensor (on any
    device whose values can be read) or a list of task names, indices and None; TaskError naming what is
    valid otherwise. `device`: the model's, named in the error for a tensor that cannot be read."""
    valid = (f"task names ({', '.join(map(repr, names))}) or indices 0-{len(names) - 1}, and None or -1 for the "
             f"shared components only") if names else "None or -1 (this adaptation has no tasks: shared components only)"
    if isinstance(tasks, Tensor):
        if tasks.dim() != 1 or tasks.is_floating_point() or tasks.is_complex() or tasks.dtype == torch.bool:
            raise TaskError(f"route() takes a 1-D integer tensor (one task index per sample), got "
                            f"{tasks.dtype} of shape {tuple(tasks.shape)}")
        try:
            index = tasks.detach().to("cpu", torch.long)
        except (RuntimeError, NotImplementedError) as e:  # a meta tensor holds no values
            raise TaskError(f"route() cannot read the task tensor on device {tasks.device} (the model is on "
                            f"{device}): {str(e).splitlines()[0]}; give the tasks as a list, or a tensor on "
                            f"{device} or the CPU") from e
    elif isinstance(tasks, (list, tuple)):
        out = []
        for t in tasks:
            if t is None:
                out.append(SHARED)
            elif isinstance(t, str):
                if t not in names:
                    raise TaskError(f"route(): unknown task {t!r}; valid: {valid}")
                out.append(list(names).index(t))
            elif isinstance(t, int) and not isinstance(t, bool):
                out.append(t)
            else:
                raise TaskError(f"route(): a sample's task is a name, an index or None, got {type(t).__name__}: {t!r}")
        index = torch.tensor(out, dtype=torch.long)
    else:
        raise TaskError(f"route() takes a list of task names (None: shared only) or a 1-D tensor of task "
                        f"indices, one per sample; got {type(tasks).__name__}")
    if index.numel() == 0:
        raise TaskError("route() got no samples; give one task per sample of the batch")
    bad = index[(index < SHARED) | (index >= len(names))]
    if bad.numel():
        raise TaskError(f"route(): task index {int(bad[0])} is out of range; valid: {valid}")
    return index


def repeat_factor(n: int, rows: int, repeats: int) -> int | None:
    """How many rows of a batch of n stand for each of `rows` samples: 1, or k inside generate() (`repeats` > 0:
    its beams and returned sequences repeat each sample); None when n is neither."""
    if n == rows:
        return 1
    return n // rows if repeats and n and n % rows == 0 else None


class Route:
    def __init__(self, index: Tensor, names: Sequence[str]) -> None:
        self.index = index.to("cpu", torch.long)  # (N,)
        self.names = tuple(names)
        self.present = sorted(set(self.index.tolist()))  # the indices that occur, SHARED first if it does
        self.mixed = len(self.present) > 1  # hooks route per sample; else the one group runs as under use()
        self.repeats = 0  # > 0 inside generate(): its batches may repeat each sample (beams, returned sequences)
        self._cache: dict[tuple, Any] = {}

    def group(self, i: int) -> str | None:
        """The adaptune group of index i: a task name, None for SHARED."""
        return None if i == SHARED else self.names[i]

    @property
    def groups(self) -> list[str | None]:
        """The groups of the samples (None: some sample runs the shared components only)."""
        return [self.group(i) for i in self.present]

    def _key(self, n: int, where: str) -> int:
        """How many rows of a batch of n each sample has: 1, or k inside generate() (TaskError otherwise)."""
        total = self.index.shape[0]
        k = repeat_factor(n, total, self.repeats)
        if k is not None:
            return k
        raise TaskError(f"{where}: the batch has {n} samples but the route gives {total} tasks; route() takes "
                        f"one task per sample (inside the model's generate(), a multiple of them: its beams and "
                        f"returned sequences repeat each sample)")

    def check(self, n: int, where: str = "route()") -> None:
        """TaskError unless a batch of n samples matches the route."""
        self._key(n, where)

    def index_for(self, n: int, device: torch.device, where: str = "route") -> Tensor:
        """The (n,) task index of a batch of n samples on `device`."""
        k = self._key(n, where)
        key = ("index", k, device)
        if key not in self._cache:
            self._cache[key] = self.index.repeat_interleave(k).to(device)
        return self._cache[key]

    def rows_for(self, n: int, device: torch.device, where: str = "route") -> dict[int, Tensor]:
        """{task index: its rows (m,)} for a batch of n samples, each task present once."""
        k = self._key(n, where)
        key = ("rows", k, device)
        if key not in self._cache:
            index = self.index.repeat_interleave(k)
            self._cache[key] = {i: (index == i).nonzero().squeeze(1).to(device) for i in self.present}
        return self._cache[key]

    def local(self, groups: Sequence[str | None], n: int, device: torch.device, where: str = "route") -> Tensor:
        """(n,) positions of each sample's group in `groups` (-1 where its group is not among them)."""
        key = ("local", tuple(groups), n, device)
        if key not in self._cache:
            lut = torch.full((len(self.names) + 1,), -1, dtype=torch.long)  # index + 1 -> position
            for pos, group in enumerate(groups):
                lut[SHARED + 1 if group is None else self.names.index(group) + 1] = pos
            self._cache[key] = lut.to(device)[self.index_for(n, device, where) + 1]
        return self._cache[key]


def per_rows(route: Route, groups: Sequence[str | None], n: int, device: torch.device, where: str,
             run: Callable[[int, Tensor], Tensor], out: Tensor) -> Tensor:
    """`out` with the rows of each sample whose group is groups[i] replaced by run(i, rows): the loop over
    tasks that components without a batched routed form run on."""
    rows = route.rows_for(n, device, where)
    for pos, group in enumerate(groups):
        i = -1 if group is None else route.names.index(group)
        if i in rows and rows[i].numel():
            out = out.index_copy(0, rows[i], run(pos, rows[i]).to(out.dtype))
    return out


BATCH = ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds", "attention_mask")  # batch first


@contextmanager
def checked(model: nn.Module, route: Any, what: str = "route()") -> Iterator[None]:
    """While the block runs: every forward of `model` checks its batch size against `route` (a Route, or
    anything with its `check(n, where)` and `repeats`: condition()'s latent), a route with one group included,
    which no hook reads; `model.generate` lets its batches repeat each sample. `what` names the block in errors."""
    def check(module: nn.Module, args: tuple, kwargs: dict) -> None:
        found = [kwargs.get(n) for n in BATCH] + list(args[:1])
        first = next((x for x in found if isinstance(x, Tensor) and x.dim()), None)
        if first is not None:
            route.check(first.shape[0], f"{what} on {type(module).__name__}")

    handle = model.register_forward_pre_hook(check, with_kwargs=True, prepend=True)  # before the prompt's
    generate, own = getattr(model, "generate", None), model.__dict__.get("generate")
    if callable(generate):
        @functools.wraps(generate)
        def repeating(*args: Any, **kwargs: Any) -> Any:
            route.repeats += 1
            try:
                return generate(*args, **kwargs)
            finally:
                route.repeats -= 1
        model.__dict__["generate"] = repeating
    try:
        yield
    finally:
        handle.remove()
        if callable(generate):
            if own is None:
                del model.__dict__["generate"]
            else:
                model.__dict__["generate"] = own
