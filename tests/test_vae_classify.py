"""Latent classification: balanced label samples, the logistic-regression probe, SST as binary, trials that
leave the run's weights as they were, and `adaptune vae classify` on a saved run."""
import json

import pytest
import torch
from typer.testing import CliRunner

from adaptune import ConfigError
from adaptune.cli.app import app
from adaptune.experiments.common.causal import load_base
from adaptune.experiments.vae.classify import (Labelled, Tuner, balanced_sample, classify, fit_logistic,
                                               minilm_features, sst_binary)
from adaptune.experiments.vae.data import Collate
from adaptune.experiments.vae.model import VAE, VAEConfig

runner = CliRunner()


def test_label_samples_are_balanced_seeded_and_capped():
    labels = [0] * 30 + [1] * 70
    a = balanced_sample(labels, 10, seed=3)
    assert a == balanced_sample(labels, 10, seed=3) and a != balanced_sample(labels, 10, seed=4)
    assert sum(labels[i] for i in a) == 5 and len(set(a)) == 10
    capped = balanced_sample(labels, 1000, seed=0)  # 30 negatives at most: 30 per class
    assert len(capped) == 60 and sum(labels[i] for i in capped) == 30


def test_the_logistic_probe_separates_separable_classes_and_not_noise():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 2
    x = torch.randn(200, 5, generator=g) + 3 * y[:, None]
    predict = fit_logistic(x[:100], y[:100])
    assert (predict(x[100:]) == y[100:]).float().mean() > 0.95
    noise = torch.randn(200, 5, generator=g)
    assert (fit_logistic(noise[:100], y[:100])(noise[100:]) == y[100:]).float().mean() < 0.7


def test_sst_binary_drops_neutral_and_lowercases():
    texts, labels = sst_binary("dev")
    assert set(labels) == {0, 1} and 800 < len(texts) < 1101  # 1,101 dev sentences, the neutral ones gone
    assert all(t == t.lower() for t in texts)


def _vae():
    base, tok = load_base("tiny-gpt2")
    return VAE(base, VAEConfig(latent_dim=4, adapter_dim=4)), tok


def _toy():
    train = [f"{w} {i}" for i in range(40) for w in ("good", "bad")]
    return Labelled("toy", (train, [int(t.startswith("good")) for t in train]),
                    (train[:20], [int(t.startswith("good")) for t in train[:20]]), {})


def test_a_trial_trains_and_then_puts_every_weight_back():
    vae, tok = _vae()
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    flags = [p.requires_grad for p in vae.base.parameters()]
    data = _toy()
    tuner = Tuner(vae, Collate(tok), finetune=True, min_steps=3, max_steps=3)
    acc = tuner.run(*data.train, data.test, seed=0)
    assert 0 <= acc <= 1 and acc * 20 == pytest.approx(round(acc * 20), abs=1e-5)  # k right of the 20 test texts
    assert all(torch.equal(before[k], v) for k, v in vae.state_dict().items())
    assert flags == [p.requires_grad for p in vae.base.parameters()]


def test_classify_reports_every_method_budget_and_seed():
    vae, tok = _vae()
    result = classify(vae, tok, _toy(), methods=["feature", "pe"], sizes=[4, 8], seeds=2)
    assert result["sizes"] == [4, 8] and set(result["results"]) == {"feature", "pe"}
    for by_n in result["results"].values():
        assert set(by_n) == {"4", "8"}
        for r in by_n.values():  # two seeds, each k right of the 20 test texts; mean and population std of them
            assert len(r["acc"]) == 2 and all(a * 20 == pytest.approx(round(a * 20), abs=1e-5) for a in r["acc"])
            assert r["mean"] == pytest.approx(sum(r["acc"]) / 2, abs=1e-6) and r["std"] == pytest.approx(
                abs(r["acc"][0] - r["acc"][1]) / 2, abs=1e-6)  # float32 values
    with pytest.raises(ConfigError, match="known: feature, pe, finetune, minilm"):
        classify(vae, tok, _toy(), methods=["knn"])
    with pytest.raises(ConfigError, match="≥ 2"):
        classify(vae, tok, _toy(), sizes=[1])


def test_minilm_features_are_mean_pooled_384_vectors():
    texts = ["the food was great .", "terrible service"]
    x = minilm_features(texts)
    assert x.shape == (2, 384) and torch.isfinite(x).all()
    alone = torch.cat([minilm_features([t]) for t in texts])  # one text a batch: no padding at all
    torch.testing.assert_close(x, alone, atol=1e-5, rtol=1e-4)  # the shorter text's padding is left out of its mean
    assert (x[0] - x[1]).abs().max() > 1e-2  # and the two texts are told apart


def test_vae_classify_cli_writes_results_and_plot_into_the_run(tmp_path):
    made = runner.invoke(app, ["run", "vae", "--base", "tiny-gpt2", "--quick", "--steps", "2", "--batch-size", "4",
                               "--eval-limit", "4", "--eval-samples", "2", "--latent-dim", "4", "--adapter-dim", "4",
                               "--out", str(tmp_path), "--name", "r"])
    assert made.exit_code == 0, made.output
    run = tmp_path / "r"
    result = runner.invoke(app, ["vae", "classify", "--run", str(run), "--labels", "4,6", "--seeds", "2",
                                 "--methods", "feature,pe", "--test-limit", "16"])
    assert result.exit_code == 0, result.output
    saved = json.loads((run / "classify-yelp.json").read_text())
    assert saved["test_sentences"] == 16 and saved["sizes"] == [4, 6] and saved["run"] == str(run)
    assert (run / "classify-yelp.png").read_bytes().startswith(b"\x89PNG")
    bad = runner.invoke(app, ["vae", "classify", "--run", str(run), "--labels", "ten"])
    assert bad.exit_code == 2 and "comma-separated integers" in bad.output
