"""Training the VAE: reconstruction + β·free-bits KL (seed eq. 4), cyclical β, the encoder side first.

    loss = −(1/B) Σ_b log p(x_b | z_b) + β(step) · kl_term(μ, log σ², λ)      z_b ~ q(z | x_b), one sample

The encoder's components and the posterior train from the first step; the decoder's components join
after `decoder_after` of the steps (the seed: 2.5k iterations first; default steps / 6). AdamW, linear
warm-up then linear decay, gradients clipped to norm `clip`. A non-finite loss stops training.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from ..common.errors import TrainingError
from ..common.training import warmup_linear
from .config import TrainConfig
from .model import VAE
from .objective import cyclical_beta, gaussian_kl, kl_term, reparameterize


def train(vae: VAE, batches: Iterator[dict], cfg: TrainConfig, generator: torch.Generator | None = None,
          on_step: Callable[[dict], None] | None = None) -> list[dict]:
    """Train for cfg.steps batches of `batches`; returns one row per step (rec, kl, beta, loss, lr)."""
    encoder, decoder = vae.trainable("encoder"), vae.trainable("decoder")
    optimizer = torch.optim.AdamW(encoder + decoder, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = warmup_linear(optimizer, cfg.steps, cfg.warmup)
    for p in decoder:
        p.requires_grad_(cfg.decoder_step == 0)
    history = []
    vae.train()
    try:
        for step in range(cfg.steps):
            if step == cfg.decoder_step:
                for p in decoder:
                    p.requires_grad_(True)
            batch = next(batches)
            ids, mask = batch["input_ids"], batch["attention_mask"]
            mean, logvar = vae.encode(ids, mask)
            if not (torch.isfinite(mean).all() and torch.isfinite(logvar).all()):
                raise TrainingError(f"the posterior's mean or log-variance is NaN or inf at step {step}; "
                                    f"lower --lr, or check the data")
            z = reparameterize(mean, logvar, generator)
            rec = -vae.log_px_given_z(z, ids, mask).mean()
            beta = cyclical_beta(step, cfg.steps, min(cfg.cycles, cfg.steps))  # at most one cycle per step
            kl = kl_term(mean, logvar, cfg.free_bits, cfg.per_dim_free_bits)
            loss = rec + beta * kl
            if not torch.isfinite(loss):
                raise TrainingError(f"the loss is {loss.item()} at step {step} (reconstruction {rec.item():.4g}, "
                                    f"KL term {kl.item():.4g}); lower --lr, or check the data")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in encoder + decoder if p.grad is not None], cfg.clip)
            optimizer.step()
            scheduler.step()
            row = {"step": step + 1, "rec": rec.item(), "kl": gaussian_kl(mean, logvar).sum(-1).mean().item(),
                   "kl_term": kl.item(), "beta": beta, "loss": loss.item(), "lr": scheduler.get_last_lr()[0],
                   "decoder": step >= cfg.decoder_step}
            history.append(row)
            if on_step is not None:
                on_step(row)
    finally:
        for p in decoder:
            p.requires_grad_(True)
        vae.eval()
    return history
