"""The latent of `adaptation.condition(z)`: one row per sample of every batch the model runs, or inside the
model's generate() a batch that repeats each sample k times (beams, several returned sequences, as
repeat_interleave). It goes through route.checked as a route does, so the two share one mechanism: the
forward pre-hook checks each batch of the model against the latent, and the wrapped generate() counts
`repeats`, outside which no batch may repeat the latent's rows.
"""
from __future__ import annotations

from torch import Tensor

from ..errors import ConfigError
from .route import repeat_factor


class Condition:
    def __init__(self, latent: Tensor) -> None:
        self.latent = latent  # (N, d_z)
        self.repeats = 0  # > 0 inside generate() (route.checked counts it)

    def factor(self, n: int, where: str) -> int:
        """How many rows of a batch of n each latent row stands for: 1, or k inside generate(); ConfigError
        otherwise."""
        rows = self.latent.shape[0]
        k = repeat_factor(n, rows, self.repeats)
        if k is not None:
            return k
        raise ConfigError(f"{where}: the latent has {rows} samples, the batch {n}; condition() takes one latent row "
                          f"per sample (only inside the model's generate() may a batch repeat each sample: its beams "
                          f"and returned sequences)")

    def check(self, n: int, where: str = "condition()") -> None:
        """ConfigError unless a batch of n samples matches the latent."""
        self.factor(n, where)
