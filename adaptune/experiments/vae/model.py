"""AdaVAE (seed 001): a VAE language model on one frozen causal LM whose weights encoder and decoder share.

    encoder  task "encoder": the first L_enc layers, Bidirectional, + its components; stops after layer L_enc,
             whose output h goes through the base's final norm (GPT-2's ln_f, Llama's norm), as a GPT-2 cut
             to L_enc layers computes it
    q(z|x)   Latent Attention (eq. 1): a_t = softmax_t(w·h_t) over real tokens, v = Σ_t a_t·h_t,
             [μ; log σ²] = W·v + b        (latent_gen="attn")
             or Optimus's pooled feature: v = tanh(W_p·h_0 + b_p), [μ; log σ²] = W·v + b  (latent_gen="pool")
    decoder  task "decoder": every layer, causal, + its components and the latent injection (PSA, AtM)
    p(x|z)   Σ over the scored tokens (every token after the first) of log softmax(logits)

The components are adaptune components attached by site, so `VAE.adaptation` saves, loads and counts
like any other adaptation; with `finetune=True` the base itself trains too (the seed's fine-tuned row).
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ... import PSA, Adaptation, Adapter, AtM, Bidirectional, Prefix, attach
from ...errors import ConfigError
from ...sites import SiteMap
from .config import VAEConfig

def default_encoder_layers(n_layers: int) -> int:
    """Two thirds of the layers, rounded (the seed: 8 of 12), at least one."""
    return max(1, round(2 * n_layers / 3))


def specs(cfg: VAEConfig, n_layers: int) -> dict[str, dict]:
    """The encoder's and decoder's components, by site."""
    enc = cfg.encoder_layers or default_encoder_layers(n_layers)
    if enc > n_layers:
        raise ConfigError(f"encoder_layers={enc} is more than the base's {n_layers} layers")
    layers = f"layers.0-{enc - 1}." if enc > 1 else "layers.0."
    injection = {"psa": PSA(cfg.latent_dim), "atm": AtM(cfg.latent_dim),
                 "both": PSA(cfg.latent_dim) | AtM(cfg.latent_dim)}[cfg.injection]
    enc_attn, dec_attn = Bidirectional(), injection
    if cfg.prefix:
        enc_attn, dec_attn = enc_attn | Prefix(cfg.prefix), dec_attn | Prefix(cfg.prefix)
    encoder, decoder = {layers + "attn": enc_attn}, {"attn": dec_attn}
    if not cfg.finetune:
        site, placement = cfg.placement.split("-")
        adapter = Adapter(cfg.adapter_dim, placement="parallel" if placement == "parallel" else "serial")
        if site == "attn":
            encoder[layers + "attn"] = encoder[layers + "attn"] | adapter
            decoder["attn"] = decoder["attn"] | adapter
        else:
            encoder[layers + "ffn"], decoder["ffn"] = adapter, adapter
    return {"encoder": encoder, "decoder": decoder}


FINAL_NORMS = ("ln_f", "norm", "final_layer_norm", "final_layernorm", "norm_f")


def final_norm(base: nn.Module, first_layer: nn.Module) -> nn.Module:
    """The norm the base applies after its layer tower (a sibling of the tower, by one of FINAL_NORMS'
    names), else the identity."""
    for parent in base.modules():
        for child in parent.children():
            if isinstance(child, nn.ModuleList) and len(child) and child[0] is first_layer:
                return next((getattr(parent, n) for n in FINAL_NORMS
                             if isinstance(getattr(parent, n, None), nn.Module)), nn.Identity())
    return nn.Identity()


class LatentAttention(nn.Module):
    """Seed eq. 1: one bias-free score per token, softmax over the real tokens, the weighted sum of h."""

    def __init__(self, d_model: int, latent_dim: int) -> None:
        super().__init__()
        self.score = nn.Linear(d_model, 1, bias=False)
        self.out = nn.Linear(d_model, 2 * latent_dim)

    def forward(self, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        scores = self.score(h).squeeze(-1).masked_fill(mask == 0, float("-inf"))  # (B, T)
        v = (scores.softmax(dim=-1).unsqueeze(-1) * h).sum(dim=1)  # (B, d)
        mean, logvar = self.out(v).chunk(2, dim=-1)  # (B, d_z) each
        return mean, logvar


class PooledLatent(nn.Module):
    """Optimus's latent generator: the first position's pooled feature, then one linear map."""

    def __init__(self, d_model: int, latent_dim: int) -> None:
        super().__init__()
        self.pool = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, 2 * latent_dim)

    def forward(self, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        first = mask.float().argmax(dim=1)  # (B,) the first real token (left padding allowed)
        v = torch.tanh(self.pool(h[torch.arange(h.shape[0]), first]))  # (B, d)
        mean, logvar = self.out(v).chunk(2, dim=-1)
        return mean, logvar


def sentence_log_px(logits: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Σ over the scored tokens (every real token after the first) of log p(token | before), (B,)."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    token = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return (token * attention_mask[:, 1:].to(logp.dtype)).sum(dim=1)


class _Stop(Exception):
    """Raised by the hook after the encoder's last layer, carrying its output."""

    def __init__(self, hidden: Tensor) -> None:
        super().__init__()
        self.hidden = hidden


class VAE(nn.Module):
    """Encoder and decoder on one base causal LM; the base's weights are shared and frozen (unless finetune)."""

    def __init__(self, base: nn.Module, cfg: VAEConfig = VAEConfig(), adaptation: Adaptation | None = None) -> None:
        """adaptation: the components already on `base` (a saved run, reloaded with adaptune.load); default:
        attach them as `cfg` says."""
        super().__init__()
        sites = SiteMap(base)
        if len(sites.towers) != 1:
            raise ConfigError("the VAE needs a causal LM with one layer tower (GPT-2, Llama, ...)")
        self.cfg, self.base = cfg, base
        n_layers = sites.n_layers
        self.encoder_layers = cfg.encoder_layers or default_encoder_layers(n_layers)
        if adaptation is None:
            adaptation = attach(base, tasks=specs(cfg, n_layers), active="encoder")
        elif adaptation.model is not base or sorted(adaptation.task_names) != ["decoder", "encoder"]:
            raise ConfigError("a VAE's adaptation is attached to its base and has the tasks encoder and decoder")
        object.__setattr__(self, "adaptation", adaptation)  # not a submodule: the base holds it (base.adaptune)
        if cfg.finetune:
            for p in base.parameters():
                p.requires_grad_(True)
        self._last = sites.towers[0].layers[self.encoder_layers - 1]
        object.__setattr__(self, "_norm", final_norm(base, sites.towers[0].layers[0]))  # the base holds it
        d = base.config.hidden_size
        posterior = LatentAttention if cfg.latent_gen == "attn" else PooledLatent
        self.posterior = posterior(d, cfg.latent_dim)

    # ---- encoder ----------------------------------------------------------------------------------

    def encode(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """(μ, log σ²) of q(z|x), each (B, d_z)."""
        def stop(module, args, output):
            raise _Stop(output[0] if isinstance(output, tuple) else output)

        handle = self._last.register_forward_hook(stop)
        try:
            with self.adaptation.using("encoder"):
                self.base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _Stop as done:
            hidden = done.hidden  # (B, T, d) after layer L_enc
        else:  # pragma: no cover - the hook always fires
            raise RuntimeError("the encoder's last layer did not run")
        finally:
            handle.remove()
        return self.posterior(self._norm(hidden), attention_mask)

    # ---- decoder ----------------------------------------------------------------------------------

    def log_px_given_z(self, z: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """log p(x|z) per sentence, (B,): the sum over scored tokens (every real token after the first)."""
        with self.adaptation.using("decoder"), self.adaptation.condition(z):
            logits = self.base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return sentence_log_px(logits, input_ids, attention_mask)

    def log_px_given_zs(self, zs: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """log p(x|z_k) for k latents per sentence: zs (B, k, d_z) -> (B, k)."""
        b, k, _ = zs.shape
        rows = lambda x: x.repeat_interleave(k, dim=0)  # noqa: E731  (B·k, ...)
        out = self.log_px_given_z(zs.reshape(b * k, -1), rows(input_ids), rows(attention_mask))
        return out.view(b, k)

    @torch.no_grad()
    def generate(self, z: Tensor, bos_token_id: int, max_new_tokens: int = 32, **kwargs) -> Tensor:
        """Sentences decoded from latents z (B, d_z), each started from BOS; kwargs go to `generate`."""
        start = torch.full((z.shape[0], 1), bos_token_id, dtype=torch.long, device=z.device)
        with self.adaptation.using("decoder"), self.adaptation.condition(z):
            return self.base.generate(start, attention_mask=torch.ones_like(start), max_new_tokens=max_new_tokens,
                                      **kwargs)

    def trainable(self, part: str) -> list[nn.Parameter]:
        """The parameters of the encoder side (its components and the posterior, and the base with
        finetune) or of the decoder's components."""
        if part == "encoder":
            params = [*self.adaptation.tasks["encoder"].parameters(), *self.posterior.parameters()]
            if self.cfg.finetune:
                ours = {id(p) for p in self.adaptation.parameters()}
                params += [p for p in self.base.parameters() if id(p) not in ours]
            return params
        if part == "decoder":
            return list(self.adaptation.tasks["decoder"].parameters())
        raise ConfigError(f"part must be 'encoder' or 'decoder', got {part!r}")
