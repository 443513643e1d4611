"""`adaptune report` on VAE runs: the table, the markdown, the λ-sweep grouping and the plots."""
import json
import math

import pytest
from typer.testing import CliRunner

from adaptune.cli.app import app
from adaptune.experiments.reports import load_results
from adaptune.experiments.vae.report import lambda_groups, markdown_table, plot_curves, plot_lambda, rows

runner = CliRunner()


def _run(tmp, name, lam=0.5, gen="attn", corpus="yelp", ppl=90.0):
    steps = 20
    history = [{"step": s + 1, "rec": 60 - s, "kl": 10 + math.sin(s), "beta": min(1.0, s / 10), "decoder": s >= 3}
               for s in range(steps)]
    result = {"format": "adaptune-vae/1", "experiment": "vae", "name": name, "train_s": 12.0,
              "config": {"corpus": corpus, "base": "small-gpt2", "steps": steps, "batch_size": 32, "seed": 0,
                         "max_length": 32,
                         "vae": {"latent_gen": gen, "injection": "psa", "placement": "ffn-parallel", "prefix": 0,
                                 "finetune": False, "latent_dim": 32},
                         "training": {"free_bits": lam, "lr": 1e-3}},
              "params": {"pct_trainable": 11.3},
              "test": {"ppl": ppl, "ppl_optimus_tokens": ppl * 0.7, "neg_elbo": 56.7, "mi": 4.0 + lam, "au": 32,
                       "base_ppl": 51.0},
              "history": history}
    (tmp / name).mkdir()
    (tmp / name / "results.json").write_text(json.dumps(result))
    return tmp / name


def test_rows_group_and_plots(tmp_path):
    paths = [_run(tmp_path, f"la-{lam}", lam, ppl=100 - 10 * lam) for lam in (0.1, 0.5, 0.75)]
    paths += [_run(tmp_path, "lg", 0.5, gen="pool", ppl=80.0)]
    results = load_results(paths)
    head, body = rows(results)
    assert head[head.index("λ")] == "λ" and [r[0] for r in body] == ["lg", "la-0.75", "la-0.5", "la-0.1"]  # by PPL
    assert body[0][head.index("posterior")] == "LG (pool)" and body[1][head.index("PPL")] == "92.50"
    groups = lambda_groups(results)
    assert len(groups) == 1 and [r["name"] for r in next(iter(groups.values()))] == ["la-0.1", "la-0.5", "la-0.75"]
    md = markdown_table(results)
    assert md.count("\n") == 6 and "| lg | yelp | small-gpt2 |" in md
    for written in (plot_lambda(results, tmp_path / "l.png"), plot_curves(results, tmp_path / "c.png")):
        assert written.read_bytes().startswith(b"\x89PNG")
    assert plot_lambda(results[3:], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def test_report_cli_on_vae_runs(tmp_path):
    runs = [str(_run(tmp_path, f"r{lam}", lam)) for lam in (0.25, 0.5)]
    plot, md = tmp_path / "out" / "rep.png", tmp_path / "rep.md"
    plot.parent.mkdir()
    result = runner.invoke(app, ["report", *runs, "--plot", str(plot), "--markdown", str(md)])
    assert result.exit_code == 0, result.output
    assert "VAE runs" in result.output and "r0.25" in result.output
    assert (tmp_path / "out" / "rep-vae-curves.png").is_file() and (tmp_path / "out" / "rep-vae-lambda.png").is_file()
    assert not plot.exists()  # no multitask runs: no multitask plot
    assert "| r0.5 |" in md.read_text()


BROKEN = {  # how a results.json is broken -> the key the error names
    "metric-missing": (lambda d: d["test"].pop("mi"), "test.mi"),
    "metric-a-string": (lambda d: d["test"].update(ppl="90.0"), "test.ppl"),
    "metric-a-bool": (lambda d: d["test"].update(au=True), "test.au"),
    "lambda-a-string": (lambda d: d["config"]["training"].update(free_bits="0.5"), "config.training.free_bits"),
    "train-s-a-string": (lambda d: d.update(train_s="12"), "train_s"),
    "history-row-without-kl": (lambda d: d["history"][3].pop("kl"), "history[3].kl"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_a_broken_vae_results_json_is_named(case, tmp_path):
    run = _run(tmp_path, "bad")
    data = json.loads((run / "results.json").read_text())
    tamper, key = BROKEN[case]
    tamper(data)
    (run / "results.json").write_text(json.dumps(data))
    result = runner.invoke(app, ["report", str(run), "--plot", str(tmp_path / "p.png")], env={"COLUMNS": "300"})
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    errors = [line for line in result.output.splitlines() if "error:" in line]
    assert len(errors) == 1 and f"missing or malformed {key}" in errors[0] and "adaptune run vae" in errors[0]
