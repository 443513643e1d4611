"""Multitask runs end to end on a tiny random BERT (MiniLM's tokenizer, nothing downloaded) and tiny data."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from adaptune.errors import ConfigError
from adaptune.experiments.common.data import load_dataset
from adaptune.experiments.common.datasets import get_dataset
from adaptune.experiments.common.methods import Method, depth, param_groups
from adaptune.experiments.multitask.report import markdown_table
from adaptune.experiments.multitask.run import ExperimentConfig, load_run, predict_run, run, schedule
from adaptune.experiments.reports import load_results

WORDS = "good bad movie great awful plot fine dull bright dark film story acting".split()


def _sentence(i: int, n: int = 6) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from transformers import AutoTokenizer, BertConfig, BertModel

    from adaptune.models import minilm_path

    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    torch.manual_seed(0)
    model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 vocab_size=len(tok), max_position_embeddings=64))
    d = tmp_path_factory.mktemp("tiny-bert")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    sst = "".join(f"{i}\tid{i}\t{_sentence(i)}\t{i % 5}\n" for i in range(24))
    (d / "ids-sst-train.csv").write_text("\tid\tsentence\tsentiment\n" + sst)
    (d / "ids-sst-dev.csv").write_text("\tid\tsentence\tsentiment\n" + "".join(sst.splitlines(True)[:12]))
    quora = "".join(f"{i}\tq{i}\t{_sentence(i, 5)}?\t{_sentence(i + i % 2, 5)}?\t{float((i + 1) % 2)}\n" for i in range(30))
    (d / "quora-dev.csv").write_text("\tid\tsentence1\tsentence2\tis_duplicate\n" + quora + "\n")  # blank row at the end
    sts = "".join(f"{i}\ts{i}\t{_sentence(i, 4)}\t{_sentence(i + 1, 4)}\t{(i % 11) / 2}\n" for i in range(24))
    (d / "sts-train.csv").write_text("\tid\tsentence1\tsentence2\tsimilarity\n" + sts)
    (d / "sts-dev.csv").write_text("\tid\tsentence1\tsentence2\tsimilarity\n" + "".join(sts.splitlines(True)[:12]))
    return str(d)


def config(model_dir, data_dir, out, method="lora", **kw):
    m = Method(method, r=2, dim=4, n=3, spec=kw.pop("spec", None), per_task=kw.pop("per_task", None))
    base = dict(model=model_dir, data_dir=data_dir, out=str(out), epochs=1, train_limit=4, dev_limit=8,
                max_length=24, batch_size=4, seed=0)
    return ExperimentConfig(m, **{**base, **kw})


def assert_dev_metrics_are_the_predictions(result, run_dir, data_dir):
    """Each task's dev metric is its saved predictions scored against the labels of the run's dev subset (config's
    limits), recomputed here: accuracy as the share of exact matches, Pearson's r by torch."""
    preds = json.loads((run_dir / "predictions.json").read_text())
    for t, r in result["tasks"].items():
        gold = [e.label for e in load_dataset(get_dataset(t), data_dir, seed=0, train_limit=4, dev_limit=8).dev]
        assert len(preds[t]) == len(gold) > 2
        if r["metric"] == "accuracy":
            assert r["dev"] == pytest.approx(sum(p == y for p, y in zip(preds[t], gold)) / len(gold)), t
        else:
            pearson = torch.corrcoef(torch.tensor([preds[t], gold], dtype=torch.float64))[0, 1].item()
            assert r["metric"] == "pearson" and r["dev"] == pytest.approx(pearson, abs=1e-6), t


METHODS = [("head-only", {}), ("full", {}), ("lora", {}), ("dora", {}), ("adapter", {}), ("lora+adapter", {}),
           ("hyper", {}), ("prefix", {}), ("prompt", {}), ("lora", {"per_task": True}),
           ("spec", {"spec": "attn=LoRA(2)|Prefix(3); ffn=Adapter(4)"})]


@pytest.mark.parametrize("method, extra", METHODS, ids=[f"{m}{'-' + str(e) if e else ''}" for m, e in METHODS])
def test_every_method_trains_evaluates_and_saves(tiny_model_dir, tiny_data, tmp_path, method, extra):
    cfg = config(tiny_model_dir, tiny_data, tmp_path, method, **extra)
    result = run(cfg)
    assert set(result["tasks"]) == {"sst", "para", "sts"}
    assert result["train_examples"] == 12  # one batch of 4 per dataset: 3 steps, round robin
    for t, r in result["tasks"].items():
        assert -1.0 <= r["dev"] <= 1.0 and all(map(math.isfinite, r["train_loss_by_epoch"]))  # no NaN, no inf
        assert r["pct_updated"] > 0
    p = result["params"]
    heads = sum(p["heads"].values())
    assert p["heads"] == {"sst": 33 * 5, "para": 33, "sts": 33}  # nn.Linear(32, k): 32k + k
    if method == "head-only":
        assert p["stored"] == heads and p["updated"]["sst"] == 33 * 5
    elif method == "full":
        assert p["updated"]["para"] == p["base"] + 33 and p["stored"] == heads
    else:
        c = p["components"]
        assert p["stored"] == c["shared"] + sum(c["per_task"].values()) + heads
        assert p["updated"]["sts"] == c["shared"] + c["per_task"]["sts"] + 33
    run_dir = tmp_path / result["run_dir"].split("/")[-1]
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["dev_average"] == pytest.approx(result["dev_average"]) and saved["files"] == result["files"]
    assert all((run_dir / f).is_file() for f in result["files"].values())
    assert_dev_metrics_are_the_predictions(result, run_dir, tiny_data)


def test_peft_trains_only_components_and_heads(tiny_model_dir, tiny_data, tmp_path):
    from adaptune.models import load_model
    base = load_model(tiny_model_dir).state_dict()
    result = run(config(tiny_model_dir, tiny_data, tmp_path, "lora+adapter"))
    cfg, model, adaptation, heads, _ = load_run(result["run_dir"])
    own = {k for k in model.state_dict() if k.startswith("adaptune.")}
    assert own and all(torch.equal(v, base[k]) for k, v in model.state_dict().items() if k not in own)
    changed = [k for k in own if k.endswith(".B") and model.state_dict()[k].abs().sum() > 0]
    assert changed  # LoRA B starts at zero: training moved it
    assert cfg.method.name == "lora+adapter" and adaptation.task_names == ["sst", "para", "sts"]


@pytest.mark.parametrize("method", ["head-only", "full", "lora+adapter", "prompt"])
def test_saved_run_reloads_and_reproduces_dev_predictions(tiny_model_dir, tiny_data, tmp_path, method):
    result = run(config(tiny_model_dir, tiny_data, tmp_path, method, epochs=2))
    saved = json.loads((tmp_path / result["run_dir"].split("/")[-1] / "predictions.json").read_text())
    again = predict_run(result["run_dir"])
    assert again.keys() == saved.keys()
    for t in saved:
        assert again[t] == pytest.approx(saved[t], abs=1e-5), t


def test_same_seed_same_metrics_other_seed_differs(tiny_model_dir, tiny_data, tmp_path):
    a = run(config(tiny_model_dir, tiny_data, tmp_path / "a", "adapter"))
    b = run(config(tiny_model_dir, tiny_data, tmp_path / "b", "adapter"))
    c = run(config(tiny_model_dir, tiny_data, tmp_path / "c", "adapter", seed=1))
    assert {t: r["dev"] for t, r in a["tasks"].items()} == {t: r["dev"] for t, r in b["tasks"].items()}
    assert {t: r["train_loss_by_epoch"][-1] for t, r in a["tasks"].items()} == {t: r["train_loss_by_epoch"][-1] for t, r in b["tasks"].items()}
    assert a["data"]["para"]["split"]["seed"] == c["data"]["para"]["split"]["seed"] == 0  # same data for every seed
    assert {t: r["train_loss_by_epoch"][-1] for t, r in a["tasks"].items()} != {t: r["train_loss_by_epoch"][-1] for t, r in c["tasks"].items()}


def test_eda_and_layer_decay_run(tiny_model_dir, tiny_data, tmp_path):
    syn = tmp_path / "syn.txt"
    syn.write_text("good fine great\nbad awful\n")
    r = run(config(tiny_model_dir, tiny_data, tmp_path, "full", augment="eda", n_aug=2, synonyms=str(syn),
                   layer_lr_decay=0.5))
    assert r["train_examples"] == 36 and r["data"]["sst"]["used"]["train_augmented"] == 12


def test_layer_wise_decay_groups():
    from helpers import tiny_bert
    model = tiny_bert(layers=3)
    Method("full").prepare(model, ["a"])
    heads = torch.nn.ModuleDict({"a": torch.nn.Linear(32, 2)})
    groups = param_groups(model, heads, lr=1.0, head_lr=0.1, n_layers=3, decay=0.5)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["encoder.layer.2.attention.self.query.weight"])] == 1.0
    assert lr_of[id(named["encoder.layer.0.output.dense.weight"])] == 0.25
    assert lr_of[id(named["embeddings.word_embeddings.weight"])] == 0.125
    assert lr_of[id(named["pooler.dense.weight"])] == 1.0 and lr_of[id(heads["a"].weight)] == 0.1
    assert depth("adaptune.shared.points.layers:1:attn:q.0.A") == 1
    assert depth("adaptune.tasks.sst.points.embed.0.prompt") == -1



@pytest.mark.parametrize("per_task, shared_kinds, task_kinds", [
    (None, {"LoRAModule"}, {"AdapterModule"}), (True, set(), {"LoRAModule", "AdapterModule"}),
    (False, {"LoRAModule", "AdapterModule"}, set())])
def test_lora_adapter_sharing_follows_the_flag(per_task, shared_kinds, task_kinds):
    from helpers import tiny_bert
    adaptation = Method("lora+adapter", r=2, dim=4, per_task=per_task).prepare(tiny_bert(layers=2), ["a", "b"])
    kinds = lambda mods: {type(m).__name__ for m in mods.modules()} & {"LoRAModule", "AdapterModule"}  # noqa: E731
    assert kinds(adaptation.shared) == shared_kinds
    assert all(kinds(adaptation.tasks[t]) == task_kinds for t in ("a", "b"))
    with pytest.raises(ConfigError, match="does not apply"):
        Method("full", per_task=True)

def test_round_robin_schedule():
    plan = schedule({"sst": 10, "para": 4, "sts": 6}, batch_size=2, seed=0, epoch=0)
    assert [t for t, _ in plan[:6]] == ["sst", "para", "sts"] * 2
    assert [t for t, _ in plan[-2:]] == ["sst", "sst"]
    for t, n in {"sst": 10, "para": 4, "sts": 6}.items():
        assert sorted(i for s, idx in plan if s == t for i in idx) == list(range(n))
    assert plan == schedule({"sst": 10, "para": 4, "sts": 6}, 2, 0, 0) != schedule({"sst": 10, "para": 4, "sts": 6}, 2, 0, 1)


def test_cli_run_and_report(tiny_model_dir, tiny_data, tmp_path):
    from adaptune.cli.app import app
    runner = CliRunner()
    out = tmp_path / "runs"
    common = ["run", "multitask", "--model", tiny_model_dir, "--data-dir", tiny_data, "--out", str(out),
              "--train-limit", "4", "--dev-limit", "8", "--max-length", "24", "--batch-size", "4", "--quick"]
    r1 = runner.invoke(app, common + ["--method", "lora", "--r", "2", "--name", "lora"])
    assert r1.exit_code == 0, r1.output
    assert "average" in r1.output and "% stored" in r1.output
    r2 = runner.invoke(app, common + ["--method", "head-only", "--name", "head"])
    assert r2.exit_code == 0, r2.output
    results = load_results([out / "lora", out / "head"])
    assert results[0]["config"]["method"]["r"] == 2 and results[0]["config"]["quick"] is True
    command = (out / "lora" / "command.txt").read_text()
    assert "adaptune run multitask" in command and "--method lora" in command
    png, md = tmp_path / "plot.png", tmp_path / "table.md"
    rep = runner.invoke(app, ["report", str(out / "lora"), str(out / "head"), "--plot", str(png), "--markdown", str(md)])
    assert rep.exit_code == 0, rep.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "lora[r=2]" in md.read_text() and md.read_text() == markdown_table(results)


def test_cli_errors_are_clear(tiny_model_dir, tiny_data, tmp_path):
    from adaptune.cli.app import app
    runner = CliRunner()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "ids-sst-train.csv").write_text("\tid\tsentence\tsentiment\n0\ta\tfine\t3\n1\tb\tbroken\tlots\n")
    (bad / "ids-sst-dev.csv").write_text("\tid\tsentence\tsentiment\n0\ta\tfine\t3\n")
    r = runner.invoke(app, ["run", "multitask", "--model", tiny_model_dir, "--data-dir", str(bad), "--tasks", "sst",
                            "--out", str(tmp_path / "runs")])
    text = "".join(r.output.split())  # rich wraps long lines
    assert r.exit_code == 2 and "ids-sst-train.csv:3:" in text and "isnotanumber" in text
    r = runner.invoke(app, ["run", "multitask", "--method", "nope", "--data-dir", tiny_data])
    assert r.exit_code == 2 and "unknown method 'nope'" in " ".join(r.output.split())
    r = runner.invoke(app, ["report", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "no results.json" in " ".join(r.output.split())


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    from transformers import GPT2Config, GPT2Model
    torch.manual_seed(0)
    model = GPT2Model(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=30522, n_positions=64))
    d = tmp_path_factory.mktemp("tiny-gpt2")
    model.save_pretrained(d)
    return str(d)


@pytest.mark.parametrize("method", ["lora", "prefix", "prompt"])
def test_gpt2_model_directory(tiny_gpt2_dir, tiny_data, tmp_path, method):
    from adaptune.models import minilm_path
    cfg = config(tiny_gpt2_dir, tiny_data, tmp_path, method, tokenizer=str(minilm_path()))
    result = run(cfg)
    assert result["model"]["class"] == "GPT2Model" and result["train_examples"] == 12
    assert all(math.isfinite(r["train_loss_by_epoch"][-1]) and r["train_loss_by_epoch"][-1] > 0
               for r in result["tasks"].values())
    saved = json.loads((tmp_path / result["run_dir"].split("/")[-1] / "predictions.json").read_text())
    assert {t: pytest.approx(p, abs=1e-5) for t, p in predict_run(result["run_dir"]).items()} == saved


def test_regression_head_starts_at_the_mean_training_score(tiny_model_dir, tiny_data, tmp_path):
    from adaptune.experiments.multitask.run import build, load_data
    cfg = config(tiny_model_dir, tiny_data, tmp_path, "lora").resolved()
    data = load_data(cfg)
    _, _, heads, _ = build(cfg, data)
    mean = sum(e.label for e in data["sts"].train) / len(data["sts"].train)
    assert heads["sts"].bias.item() == pytest.approx(mean)
    assert heads["para"].bias.item() != pytest.approx(mean)  # classification heads keep nn.Linear's init


def test_glue_folder_runs_end_to_end(tiny_model_dir, tmp_path):
    """GLUE layout: SST-2/{train,dev}.tsv and STS-B/{train,dev}.tsv, quotes read literally."""
    for sub in ("SST-2", "STS-B"):
        (tmp_path / "glue" / sub).mkdir(parents=True)
    sst2 = "sentence\tlabel\n" + "".join(f'{_sentence(i)} "q\t{i % 2}\n' for i in range(16))
    stsb = ("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
            + "".join(f"{i}\tg\tf\t2012\t{i}\ts\ts\t{_sentence(i, 4)}\t{_sentence(i + 2, 4)}\t{(i % 6) * 0.8:.1f}\n"
                      for i in range(16)))
    for sub, text in (("SST-2", sst2), ("STS-B", stsb)):
        (tmp_path / "glue" / sub / "train.tsv").write_text(text)
        (tmp_path / "glue" / sub / "dev.tsv").write_text(text)
    result = run(config(tiny_model_dir, str(tmp_path / "glue"), tmp_path / "runs", "adapter", tasks=("sst2", "stsb")))
    assert set(result["tasks"]) == {"sst2", "stsb"} and result["tasks"]["stsb"]["metric"] == "pearson"
    assert set(result["tasks"]["stsb"]["metrics"]) == {"pearson", "spearman"}
    assert set(result["tasks"]["sst2"]["metrics"]) == {"accuracy", "matthews"}
    assert result["data"]["sst2"]["available"] == {"train": 16, "dev": 16}


def test_report_skips_non_runs_and_labels_learning_rates(tiny_model_dir, tiny_data, tmp_path):
    from adaptune.experiments.multitask.report import relative_to_full, rows, run_label
    from adaptune.experiments.reports import find_runs
    out = tmp_path / "runs"
    a = run(config(tiny_model_dir, tiny_data, out, "full", name="full"))
    b = run(config(tiny_model_dir, tiny_data, out, "full", lr=1e-3, name="full-hi"))
    (out / "report.png").write_bytes(b"")
    (out / "unfinished").mkdir()
    found, skipped = find_runs(sorted(out.iterdir()))
    assert sorted(p.name for p in found) == ["full", "full-hi"] and len(skipped) == 2
    results = load_results(found)
    assert relative_to_full(results) == max(a["dev_average"], b["dev_average"])
    assert sorted(run_label(r) for r in results) == ["full", "full[lr=0.001]"]
    head, body = rows(results)
    assert head[0] == "method" and "% of full" in head and len(body) == 2


def test_cli_refuses_bad_threads_and_conflicting_spec(tiny_data):
    from adaptune.cli.app import app
    runner = CliRunner()
    r = runner.invoke(app, ["run", "multitask", "--threads", "0", "--data-dir", tiny_data])
    assert r.exit_code == 2 and "--threads must be at least 1" in r.output
    r = runner.invoke(app, ["run", "multitask", "--method", "lora", "--spec", "attn=LoRA(2)", "--data-dir", tiny_data])
    assert r.exit_code == 2 and "drop --method lora or --spec" in " ".join(r.output.split())


def test_results_saved_before_stack_became_spec_are_reported_and_reloaded(tmp_path):
    """The committed results.json files were written while --spec was --stack: config.method holds `stack`."""
    from adaptune.cli.app import app

    committed = Path(__file__).resolve().parents[1] / "benchmarks/results/multitask/per-run/head-only-seed0.json"
    saved = json.loads(committed.read_text())
    assert saved["config"]["method"]["stack"] is None and "spec" not in saved["config"]["method"]
    (tmp_path / "old").mkdir()
    shutil.copy(committed, tmp_path / "old" / "results.json")
    r = CliRunner().invoke(app, ["report", str(tmp_path / "old"), "--plot", str(tmp_path / "r.png"),
                                 "--markdown", str(tmp_path / "r.md")])
    assert r.exit_code == 0, r.output
    assert "| head-only |" in (tmp_path / "r.md").read_text() and (tmp_path / "r.png").is_file()
    assert ExperimentConfig.from_dict(saved["config"]).method == Method("head-only")
    composed = {**saved["config"], "method": {**saved["config"]["method"], "name": "stack", "stack": "attn=LoRA(2)"}}
    assert ExperimentConfig.from_dict(composed).method == Method("spec", spec="attn=LoRA(2)")
