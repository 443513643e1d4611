"""Multitask training and evaluation in mixed batches (--batching mixed): the schedule, the loss weights, and
whole runs on the tiny BERT and data of test_experiments_run.py."""
import json

import pytest
import torch
from test_experiments_run import assert_dev_metrics_are_the_predictions, config, tiny_data, tiny_model_dir  # noqa: F401
from typer.testing import CliRunner

from adaptune.errors import ConfigError
from adaptune.experiments.multitask.run import ExperimentConfig, predict_run, run
from adaptune.experiments.multitask.training import loss_of, mixed_loss, mixed_schedule

SIZES = {"sst": 10, "para": 4, "sts": 6}


def test_mixed_schedule_uses_every_example_once_in_batches_ordered_by_dataset():
    plan = mixed_schedule(SIZES, batch_size=4, seed=0, epoch=0)
    assert [len(b) for b in plan] == [4, 4, 4, 4, 4]
    for t, n in SIZES.items():
        assert sorted(i for b in plan for s, i in b if s == t) == list(range(n))
    assert any(len({s for s, _ in b}) > 1 for b in plan)  # the batches mix datasets
    rank = {t: k for k, t in enumerate(SIZES)}
    assert all([rank[s] for s, _ in b] == sorted(rank[s] for s, _ in b) for b in plan)
    assert plan == mixed_schedule(SIZES, 4, 0, 0) != mixed_schedule(SIZES, 4, 0, 1)


def test_mixed_loss_weights_each_dataset_by_its_share_of_the_batch():
    heads = torch.nn.ModuleDict({"sst": torch.nn.Linear(3, 5), "sts": torch.nn.Linear(3, 1)})
    pooled = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    batch = [("sst", 0), ("sst", 3), ("sst", 1), ("sts", 2)]
    labels = torch.tensor([1.0, 4.0, 0.0, 2.5])
    total, parts = mixed_loss({"sst": "classes", "sts": "regression"}, heads, pooled, batch, labels)
    ce = loss_of("classes", heads["sst"](pooled[:3]), labels[:3])
    mse = loss_of("regression", heads["sts"](pooled[3:]), labels[3:])
    torch.testing.assert_close(total, 0.75 * ce + 0.25 * mse)
    assert parts == pytest.approx({"sst": ce.item(), "sts": mse.item()})


@pytest.mark.parametrize("method", ["lora", "adapter", "prompt", "lora+adapter"])
def test_a_mixed_run_trains_evaluates_saves_and_reloads(tiny_model_dir, tiny_data, tmp_path, method):  # noqa: F811
    result = run(config(tiny_model_dir, tiny_data, tmp_path, method, batching="mixed", per_task=True
                        if method in ("lora", "prompt") else None))
    assert result["config"]["batching"] == "mixed" and result["train_steps"] == 3  # 12 examples, batches of 4
    assert_dev_metrics_are_the_predictions(result, tmp_path / result["run_dir"].split("/")[-1], tiny_data)
    saved = json.loads((tmp_path / result["run_dir"].split("/")[-1] / "predictions.json").read_text())
    again = predict_run(result["run_dir"])
    for t in saved:
        assert again[t] == pytest.approx(saved[t], abs=1e-5), t


def test_mixed_evaluation_predicts_what_dataset_by_dataset_evaluation_does(tiny_model_dir, tiny_data, tmp_path):  # noqa: F811
    result = run(config(tiny_model_dir, tiny_data, tmp_path, "adapter", per_task=True, epochs=2))
    by_dataset = predict_run(result["run_dir"])
    results = tmp_path / result["run_dir"].split("/")[-1] / "results.json"
    saved = json.loads(results.read_text())
    saved["config"]["batching"] = "mixed"
    results.write_text(json.dumps(saved))
    mixed = predict_run(result["run_dir"])
    for t in by_dataset:
        assert mixed[t] == pytest.approx(by_dataset[t], abs=1e-4), t


def test_batching_is_checked_and_offered_on_the_cli(tiny_model_dir, tiny_data, tmp_path):  # noqa: F811
    with pytest.raises(ConfigError, match=r"batching \(--batching\) must be 'round-robin' or 'mixed', got 'shuffled'"):
        ExperimentConfig(batching="shuffled")
    from adaptune.cli.app import app
    r = CliRunner().invoke(app, ["run", "multitask", "--model", tiny_model_dir, "--data-dir", tiny_data, "--out",
                                 str(tmp_path), "--method", "adapter", "--epochs", "1", "--train-limit", "4",
                                 "--dev-limit", "4", "--batch-size", "4", "--batching", "mixed", "--name", "m"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "m" / "results.json").read_text())["config"]["batching"] == "mixed"
