"""VAE training (encoder side first, cyclical β, free bits) and evaluation on a tiny random base."""
import itertools

import pytest
import torch
from helpers import VOCAB, tiny_gpt2

from adaptune import ConfigError, TrainingError
from adaptune.experiments.vae.evaluation import evaluate
from adaptune.experiments.vae.model import VAE, VAEConfig
from adaptune.experiments.vae.objective import cyclical_beta
from adaptune.experiments.vae.training import TrainConfig, train


def batches(same=False):
    g = torch.Generator().manual_seed(0)
    fixed = None
    while True:
        ids = torch.randint(2, VOCAB, (4, 8), generator=g) if fixed is None or not same else fixed
        fixed = ids
        mask = torch.ones_like(ids)
        mask[1, 6:] = 0
        yield {"input_ids": ids, "attention_mask": mask, "n_tokens": mask.sum(1), "n_scored": mask.sum(1) - 1}


def vae(**kw):
    return VAE(tiny_gpt2(n_layer=3), VAEConfig(latent_dim=8, adapter_dim=8, **kw))


def test_the_decoder_joins_after_its_share_of_the_steps_and_beta_cycles():
    model = vae()
    decoder = [p.detach().clone() for p in model.trainable("decoder")]
    encoder = [p.detach().clone() for p in model.trainable("encoder")]
    seen = []
    cfg = TrainConfig(steps=6, lr=1e-2, decoder_after=0.5)

    def check(row):
        if row["step"] == 3:  # the last step before the decoder joins (steps 1-3 of 6)
            seen.append(all(torch.equal(a, b) for a, b in zip(decoder, model.trainable("decoder"))))
    history = train(model, batches(), cfg, generator=torch.Generator().manual_seed(1), on_step=check)
    assert seen == [True]
    assert any(not torch.equal(a, b) for a, b in zip(decoder, model.trainable("decoder")))
    assert all(not torch.equal(a, b) for a, b in zip(encoder, model.trainable("encoder")) if a.numel() > 1)
    assert [r["beta"] for r in history] == [cyclical_beta(s, 6, 4) for s in range(6)]
    assert [r["decoder"] for r in history] == [False] * 3 + [True] * 3
    assert all(p.requires_grad for p in model.trainable("decoder"))


def test_training_fits_a_repeated_batch():
    """Fine-tuned (a tiny random base's frozen, tied output layer cannot make confident predictions)."""
    model = vae(finetune=True)
    history = train(model, batches(same=True), TrainConfig(steps=40, lr=1e-2, cycles=1, warmup=0.0),
                    generator=torch.Generator().manual_seed(1))
    assert history[-1]["rec"] < 0.2 * history[0]["rec"]


def test_a_non_finite_loss_stops_training_and_leaves_the_model_usable():
    model = vae()
    with torch.no_grad():
        model.posterior.out.weight.fill_(float("nan"))
    with pytest.raises(TrainingError, match="NaN or inf at step 0"):
        train(model, batches(), TrainConfig(steps=2))
    assert not model.training and all(p.requires_grad for p in model.trainable("decoder"))


@pytest.mark.parametrize("kw, words", [({"steps": 0}, "steps must be a positive integer"),
                                       ({"lr": float("nan")}, "lr must be a positive finite number"),
                                       ({"decoder_after": 1.0}, "decoder_after is a share of the steps"),
                                       ({"free_bits": -1}, "free_bits")])
def test_bad_training_configs_say_what_is_valid(kw, words):
    with pytest.raises(ConfigError, match=words):
        TrainConfig(**kw)


def test_evaluation_counts_tokens_both_ways_and_is_deterministic():
    model = vae()
    first = evaluate(model, itertools.islice(batches(), 2), samples=6, chunk=4, seed=3)
    again = evaluate(model, itertools.islice(batches(), 2), samples=6, chunk=4, seed=3)
    assert first == again
    assert first["sentences"] == 8 and first["tokens_optimus"] - first["tokens_scored"] == 8
    assert first["ppl_optimus_tokens"] < first["ppl"]  # more tokens, same log-likelihood
    assert first["neg_elbo"] >= first["nll"] - 1e-4  # the ELBO bounds log p(x) (up to estimator noise)
    assert 0 <= first["au"] <= 8 and len(first["au_variances"]) == 8
