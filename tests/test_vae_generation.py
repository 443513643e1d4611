"""Sentences from a trained VAE run: sample, reconstruct, interpolate, analogy (library and CLI)."""
import pytest
import torch
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
