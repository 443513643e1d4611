"""The VAE's language-modelling metrics on one split, as Optimus computes them (see metrics.py).

    PPL      exp(−Σ log p(x) / Σ tokens), log p(x) importance-weighted with `samples` draws (Optimus: 100),
             under two token conventions: the tokens scored (every token after BOS) and Optimus's
             (BPE tokens with BOS and EOS)
    −ELBO    per sentence: −(1/K) Σ_k log p(x|z_k) + KL(q(z|x) ‖ p(z)) over the same K draws
    MI, AU   over the split's posteriors: calc_mi with one z per x, and dimensions whose posterior-mean
             variance is ≥ 0.01
    base PPL the frozen base's own perplexity on the same tokens (every component off), for reference
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from .metrics import active_units, importance_weighted_log_px, mutual_information, neg_elbo, perplexity
from .model import VAE, sentence_log_px
from .objective import gaussian_kl


@torch.no_grad()
def base_log_px(vae: VAE, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log p(x) per sentence under the base model alone, over the same scored tokens, (B,)."""
    with vae.adaptation.disabled():
        logits = vae.base(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return sentence_log_px(logits, ids, mask)


@torch.no_grad()
def evaluate(vae: VAE, batches: Iterable[dict], samples: int = 100, chunk: int = 10, seed: int = 0,
             on_batch: Callable[[int], None] | None = None) -> dict:
    """The metrics over every batch (input_ids, attention_mask, n_tokens, n_scored)."""
    vae.eval()
    generator = torch.Generator(next(vae.posterior.parameters()).device).manual_seed(seed)  # where z is drawn
    totals = {"log_px": 0.0, "rec": 0.0, "kl": 0.0, "base": 0.0, "scored": 0, "tokens": 0, "n": 0}
    means, logvars = [], []
    for batch in batches:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        mean, logvar = vae.encode(ids, mask)
        iw = importance_weighted_log_px(lambda zs: vae.log_px_given_zs(zs, ids, mask), mean, logvar,
                                        samples=samples, chunk=chunk, generator=generator)
        totals["log_px"] += iw.log_px.sum().item()
        totals["rec"] -= iw.log_px_given_z.sum().item()
        totals["kl"] += gaussian_kl(mean, logvar).sum().item()
        totals["base"] += base_log_px(vae, ids, mask).sum().item()
        totals["scored"] += int(batch["n_scored"].sum())
        totals["tokens"] += int(batch["n_tokens"].sum())
        totals["n"] += ids.shape[0]
        means.append(mean)
        logvars.append(logvar)
        if on_batch is not None:
            on_batch(ids.shape[0])
    mean, logvar = torch.cat(means), torch.cat(logvars)
    au, variances = active_units(mean)
    return {
        "sentences": totals["n"], "samples": samples,
        "ppl": perplexity(totals["log_px"], totals["scored"]),
        "ppl_optimus_tokens": perplexity(totals["log_px"], totals["tokens"]),
        "neg_elbo": neg_elbo(totals["rec"], totals["kl"], totals["n"]),
        "rec": totals["rec"] / totals["n"], "kl": totals["kl"] / totals["n"],
        "nll": -totals["log_px"] / totals["n"],
        "mi": mutual_information(mean, logvar, generator=generator),
        "au": au, "au_variances": variances.tolist(),
        "base_ppl": perplexity(totals["base"], totals["scored"]),
        "base_ppl_optimus_tokens": perplexity(totals["base"], totals["tokens"]),
        "tokens_scored": totals["scored"], "tokens_optimus": totals["tokens"],
    }
