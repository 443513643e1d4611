"""Sentences from a trained VAE: decoded from latents, reconstructed, interpolated, by analogy (seed
Tables 4-5). Latents of sentences are their posterior means; decoding starts from BOS, with the KV
cache, greedy or sampled (top-k / top-p) under a seed.

    interpolation  z_τ = (1 − τ)·z_A + τ·z_B,  τ = 0, 1/(n−1), ..., 1
    analogy        z_D = z_B − z_A + z_C        (A is to B as C is to D)
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from ...errors import ConfigError
from .data import Collate
from .model import VAE


@torch.no_grad()
def latents(vae: VAE, tokenizer: Any, texts: Sequence[str], max_length: int = 32) -> Tensor:
    """The posterior means of `texts`, (N, d_z)."""
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise ConfigError("give at least one non-empty sentence")
    batch = Collate(tokenizer, max_length)(list(texts))
    return vae.encode(batch["input_ids"], batch["attention_mask"])[0]


@torch.no_grad()
def decode(vae: VAE, tokenizer: Any, z: Tensor, *, max_length: int = 32, greedy: bool = False, top_k: int = 0,
           top_p: float = 0.9, seed: int = 0) -> list[str]:
    """One sentence per latent row of z (N, d_z)."""
    if not 0 < top_p <= 1 or top_k < 0:
        raise ConfigError(f"top_p must be in (0, 1] and top_k ≥ 0; got top_p={top_p}, top_k={top_k}")
    d = vae.cfg.latent_dim
    if not isinstance(z, Tensor) or z.dim() != 2 or z.shape[0] < 1 or z.shape[1] != d:
        shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
        raise ConfigError(f"decode takes latents of shape (N, {d}) with N ≥ 1 sentences, got {shape}")
    collate = Collate(tokenizer, max_length)
    sampling = {} if greedy else {"do_sample": True, "top_k": top_k, "top_p": top_p}
    torch.manual_seed(seed)
    ids = vae.generate(z, collate.bos, max_new_tokens=max_length - 1, eos_token_id=collate.eos,
                       pad_token_id=collate.pad, **({"do_sample": False} if greedy else sampling))
    return [tokenizer.decode(row[1:], skip_special_tokens=True).strip() for row in ids.tolist()]


def interpolate(z_a: Tensor, z_b: Tensor, steps: int = 11) -> Tensor:
    """(steps, d_z): z_A to z_B in equal steps of τ (the seed: 11, τ = 0, 0.1, ..., 1)."""
    if steps < 2:
        raise ConfigError(f"an interpolation needs at least 2 steps, got {steps}")
    tau = torch.linspace(0, 1, steps, dtype=z_a.dtype).unsqueeze(1)  # (steps, 1)
    return (1 - tau) * z_a + tau * z_b


def analogy(z_a: Tensor, z_b: Tensor, z_c: Tensor) -> Tensor:
    """z_D = z_B − z_A + z_C."""
    return z_b - z_a + z_c
