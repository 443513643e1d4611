"""Sentences from a trained VAE run: sample, reconstruct, interpolate, analogy (library and CLI)."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from adaptune import ConfigError
from adaptune.cli.app import app
from adaptune.experiments.vae.generation import analogy, decode, interpolate, latents
from adaptune.experiments.vae.run import load_run

runner = CliRunner()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    result = runner.invoke(app, ["run", "vae", "--base", "tiny-gpt2", "--quick", "--steps", "2", "--batch-size", "4",
                                 "--eval-limit", "4", "--eval-samples", "2", "--latent-dim", "4",
                                 "--adapter-dim", "4", "--out", str(out), "--name", "r"])
    assert result.exit_code == 0, result.output
    return out / "r"


def test_interpolation_and_analogy_are_the_stated_formulas():
    a, b, c = torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0]), torch.tensor([5.0, 5.0])
    path = interpolate(a, b, 11)
    assert path.shape == (11, 2) and torch.equal(path[0], a) and torch.equal(path[-1], b)
    torch.testing.assert_close(path[3], 0.7 * a + 0.3 * b)
    assert torch.equal(analogy(a, b, c), torch.tensor([6.0, 3.0]))
    with pytest.raises(ConfigError, match="at least 2 steps"):
        interpolate(a, b, 1)


def test_decoding_is_deterministic_under_a_seed_and_latents_are_posterior_means(run_dir):
    vae, tok, _ = load_run(run_dir)
    z = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    first, again = (decode(vae, tok, z, seed=5) for _ in range(2))
    assert first == again and len(first) == 3
    assert decode(vae, tok, z, greedy=True) == decode(vae, tok, z, greedy=True, seed=9)
    texts = ["tasty nachos .", "the staff was rude ."]
    means = latents(vae, tok, texts)
    from adaptune.experiments.vae.data import Collate
    batch = Collate(tok)(texts)
    torch.testing.assert_close(means, vae.encode(batch["input_ids"], batch["attention_mask"])[0])
    with pytest.raises(ConfigError, match="top_p"):
        decode(vae, tok, z, top_p=0.0)


@pytest.mark.parametrize("args, lines", [
    (["sample", "--n", "2"], 2), (["reconstruct", "tasty nachos .", "great food ."], 4),
    (["interpolate", "tasty nachos .", "the staff was rude .", "--steps", "3"], 3),
    (["analogy", "good food .", "bad food .", "good service ."], 4)])
def test_the_cli_prints_one_line_per_sentence(run_dir, args, lines):
    result = runner.invoke(app, ["vae", *args, "--run", str(run_dir)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert len([ln for ln in result.output.splitlines() if ln.strip()]) >= lines


def test_a_missing_run_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["vae", "sample", "--run", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "not a saved VAE run" in result.output


def _without(key):
    def tamper(run):
        data = json.loads((run / "results.json").read_text())
        del data[key]
        (run / "results.json").write_text(json.dumps(data))
    return tamper


def _other_latent_size(run):
    """posterior.safetensors as a run of latent size 8 would have it (this run's is 4): its output layer gives
    the mean and log-variance, 2 x 8 rows."""
    state = load_file(str(run / "posterior.safetensors"))
    save_file({k: torch.zeros(16, *v.shape[1:]) if k.startswith("out.") else v for k, v in state.items()},
              str(run / "posterior.safetensors"))


BAD_RUNS = {  # vae sample args, how the copied run is broken, a fragment of the one-line error
    "n-0": (["--n", "0"], None, "--n must be at least 1"),
    "n-negative": (["--n", "-1"], None, "--n must be at least 1 (the number of sentences to sample), got -1"),
    "posterior-missing": ([], lambda run: (run / "posterior.safetensors").unlink(), "posterior.safetensors: missing"),
    "results-without-config": ([], _without("config"), "results.json: missing or malformed config"),
    "posterior-of-another-latent-size": ([], _other_latent_size, "does not fit the posterior of latent size 4"),
    "results-metric-a-string": ([], lambda run: _set_ppl(run, "12.5"), "results.json: missing or malformed test.ppl"),
}


def _set_ppl(run, value):
    data = json.loads((run / "results.json").read_text())
    data["test"]["ppl"] = value
    (run / "results.json").write_text(json.dumps(data))


@pytest.mark.parametrize("case", BAD_RUNS)
def test_a_broken_run_or_bad_option_is_one_clear_error(case, run_dir, tmp_path):
    args, tamper, fragment = BAD_RUNS[case]
    run = tmp_path / "r"
    shutil.copytree(run_dir, run)
    if tamper:
        tamper(run)
    result = runner.invoke(app, ["vae", "sample", "--run", str(run), *args], env={"COLUMNS": "300"})
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    errors = [line for line in result.output.splitlines() if "error:" in line]
    assert len(errors) == 1 and fragment in errors[0], result.output


def test_decode_refuses_latents_of_no_rows_or_another_size(run_dir):
    vae, tok, _ = load_run(run_dir)
    for z in (torch.zeros(0, 4), torch.zeros(2, 5)):
        with pytest.raises(ConfigError, match=r"latents of shape \(N, 4\)"):
            decode(vae, tok, z)
