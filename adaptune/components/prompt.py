"""Prompt tuning (Lester et al.): n trainable soft tokens in front of the input embeddings.

The model sees [prompt (n), tokens (T)]: its outputs (logits, hidden states) include the n virtual
positions at the front; take `[:, n:]` for the real tokens (hooks/embed.py extends the attention
mask, token types, labels and position ids to match). Parameters: n·d_model.

init:
  "vocab"    rows of the input embedding at n random token ids (the paper's sampled-vocabulary init)
  "normal"   N(0, initializer_range²) like the embedding's own init (0.02 when the config has none)
token_ids: initialise from the embeddings of these ids (a text prompt); its length must be n.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import BindError, ConfigError
from ..points import EMBED, Point
from .base import Component, check_choice, check_positive

INITS = ("vocab", "normal")


@dataclass(frozen=True)
class PromptTuning(Component):
    n: int = 20
    init: str = "vocab"
    token_ids: tuple[int, ...] | None = None  # initialise from these ids (overrides init)

    kind = EMBED

    def __post_init__(self) -> None:
        check_positive("n", self.n)
        check_choice("init", self.init, INITS)
        if self.token_ids is not None:
            ids = self.token_ids
            if (not isinstance(ids, (list, tuple)) or
                    not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)):
                raise ConfigError(f"token_ids must be a list of non-negative integer token ids, got {ids!r}")
            if len(ids) != self.n:
                raise ConfigError(f"token_ids has {len(ids)} ids but n={self.n}; give n={len(ids)} or "
                                  f"exactly {self.n} ids")
            object.__setattr__(self, "token_ids", tuple(ids))  # hashable; JSON gives back a list

    def bind(self, point: Point, shared=None) -> "PromptModule":
        return PromptModule(self, point)


class PromptModule(nn.Module):
    """The soft prompt of one model, (n, d_model): a PromptSource (components/contract.py)."""

    def __init__(self, component: PromptTuning, point: Point) -> None:
        super().__init__()
        embed = point.module
        weight = embed.weight  # (V, d)
        vocab = weight.shape[0]
        if component.token_ids is not None:
            bad = [i for i in component.token_ids if i >= vocab]
            if bad:
                raise BindError(f"{component!r}: token ids {bad} are out of range; "
                                f"the vocabulary has {vocab} ids (0-{vocab - 1})")
            ids = torch.tensor(component.token_ids, device=weight.device)
        elif component.init == "vocab":
            ids = torch.randint(0, vocab, (component.n,), device=weight.device)
        else:
            ids = None
        if ids is not None:
            with torch.no_grad():
                init = embed(ids).detach().clone()  # through the module: keeps any embedding scale
        else:
            std = getattr(getattr(point.model, "config", None), "initializer_range", None) or 0.02
            init = torch.randn(component.n, weight.shape[1], device=weight.device) * std
        self.prompt = nn.Parameter(init.float())  # (n, d)

    def extra_repr(self) -> str:
        return f"n={self.prompt.shape[0]}, d={self.prompt.shape[1]}"

    def forward(self) -> Tensor:
        return self.prompt
