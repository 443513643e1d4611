"""`adaptune run vae` through the CLI on a tiny random base: every ablation runs, the run is saved whole."""
import json
import math

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from adaptune.cli.app import app

runner = CliRunner()
TINY = ["run", "vae", "--base", "tiny-gpt2", "--quick", "--steps", "2", "--batch-size", "4", "--eval-limit", "4",
        "--eval-samples", "2", "--latent-dim", "4", "--adapter-dim", "4"]
ABLATIONS = {  # the seed's Table 1 rows
    "adavae": [], "finetune": ["--finetune"], "lg": ["--latent-gen", "pool"],
    "lg-atm": ["--latent-gen", "pool", "--injection", "atm"], "lg-both": ["--latent-gen", "pool", "--injection", "both"],
    "prefix": ["--prefix", "3"], "parallel-attn": ["--placement", "attn-parallel"],
    "serial-attn": ["--placement", "attn-serial"],
}


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_every_ablation_runs_and_saves_its_run(ablation, tmp_path):
    result = runner.invoke(app, [*TINY, *ABLATIONS[ablation], "--out", str(tmp_path), "--name", ablation])
    assert result.exit_code == 0, result.output
    run = tmp_path / ablation
    results = json.loads((run / "results.json").read_text())
    test = results["test"]
    assert test["sentences"] == 4 and test["tokens_optimus"] - test["tokens_scored"] == 4
    assert all(math.isfinite(test[k]) for k in ("ppl", "neg_elbo", "mi", "base_ppl")), test  # not NaN, not inf
    # the metrics are the sums they are defined by: −ELBO = reconstruction + KL, PPL = exp(NLL per scored token)
    assert test["neg_elbo"] == pytest.approx(test["rec"] + test["kl"]) and test["kl"] >= 0 and test["rec"] > 0
    for ppl, tokens in (("ppl", "tokens_scored"), ("ppl_optimus_tokens", "tokens_optimus")):
        assert test[ppl] == pytest.approx(math.exp(test["nll"] * test["sentences"] / test[tokens])), ppl
    assert test["ppl"] > test["ppl_optimus_tokens"] > 1 and test["base_ppl"] > 1
    assert len(test["au_variances"]) == 4 and 0 <= test["au"] <= 4  # --latent-dim 4
    assert len(results["history"]) == 2 and len(results["samples"]) == 3
    assert (run / "command.txt").read_text().startswith("adaptune run vae")
    assert load_file(str(run / "posterior.safetensors"))
    assert (run / "model.safetensors").exists() == (ablation == "finetune")
    pct = results["params"]["pct_trainable"]
    assert pct == pytest.approx(100 * results["params"]["trainable"] / results["base"]["params"])
    assert (pct > 90) if ablation == "finetune" else (0 < pct < 50)


def test_an_existing_run_is_refused_and_bad_flags_name_what_is_valid(tmp_path):
    args = [*TINY, "--out", str(tmp_path), "--name", "r"]
    assert runner.invoke(app, args).exit_code == 0
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--overwrite" in again.output
    bad = runner.invoke(app, [*TINY, "--injection", "sum", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "injection must be one of psa, atm, both" in bad.output
    corpus = runner.invoke(app, [*TINY, "--corpus", "imdb", "--out", str(tmp_path)])
    assert corpus.exit_code == 2 and "yelp" in corpus.output


@pytest.mark.parametrize("ablation", ["adavae", "finetune"])
def test_a_saved_run_reloads_and_reproduces_its_metrics(ablation, tmp_path):
    from adaptune.experiments.vae.run import reevaluate
    result = runner.invoke(app, [*TINY, *ABLATIONS[ablation], "--out", str(tmp_path), "--name", "r"])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "r" / "results.json").read_text())["test"]
    again = reevaluate(tmp_path / "r")
    assert again.pop("au_variances") == pytest.approx(saved.pop("au_variances"), rel=1e-6, abs=1e-9)
    assert again == pytest.approx(saved, rel=1e-6, abs=1e-6)


def test_a_directory_that_is_not_a_vae_run_is_refused(tmp_path):
    from adaptune import LoadError
    from adaptune.experiments.vae.run import load_run
    (tmp_path / "results.json").write_text(json.dumps({"format": "adaptune-multitask/1"}))
    with pytest.raises(LoadError, match="not 'adaptune-vae/1'"):
        load_run(tmp_path)
