"""`adaptune run fewshot` and `adaptune tapt` end to end on tiny random bases and a tiny SST-like data folder:
every mode, the recipes, TAPT components loading into the fine-tuning run, determinism and clear errors."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from adaptune.errors import ConfigError, LoadError
from adaptune.experiments.common.training import Encoder
from adaptune.experiments.fewshot.bases import load_lm
from adaptune.experiments.fewshot.config import FewShotConfig, FewShotMethod
from adaptune.experiments.fewshot.prompts import Prompt
from adaptune.experiments.fewshot.run import _components, run
from adaptune.experiments.fewshot.tapt import TaptConfig, tapt
from adaptune.experiments.fewshot.train import accuracy, predict, scorer

WORDS = ["good", "bad", "film", "plot", "great", "dull", "story", "fun", "slow", "long"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("sst")
    g = torch.Generator().manual_seed(0)
    for name, n in (("ids-sst-train.csv", 60), ("ids-sst-dev.csv", 20)):
        rows = ["\tid\tsentence\tsentiment"]
        for i in range(n):
            words = " ".join(WORDS[j] for j in torch.randint(0, len(WORDS), (5,), generator=g).tolist())
            rows.append(f"{i}\tx{i}\t{words} .\t{i % 5}")
        (d / name).write_text("\n".join(rows) + "\n")
    return str(d)


def config(data, tmp_path, **kw):
    base = dict(model="tiny-gpt2", data_dir=data, k=3, seeds=("0", "1"), steps=4, eval_every=2, batch_size=4,
                max_length=32, out=str(tmp_path / "runs"))
    return FewShotConfig(**{**base, **kw})


def test_prompt_run_writes_every_seed_and_the_summary(data, tmp_path):
    result = run(config(data, tmp_path, self_ensemble=2, self_distill=0.5))
    saved = json.loads((tmp_path / "runs" / result["name"] / "results.json").read_text())
    assert [r["seed"] for r in saved["seeds"]] == [0, 1]
    tests = [r["test"] for r in saved["seeds"]]
    assert saved["summary"]["test"]["mean"] == pytest.approx(sum(tests) / 2)
    assert saved["summary"]["test"]["std"] == pytest.approx(abs(tests[0] - tests[1]) / 2)
    for r in saved["seeds"]:
        assert r["train"] == r["dev"] == 6 and len(r["history"]) == 4 and "ensemble_test" in r
        assert any("mse" in row for row in r["history"])  # the teacher joined once a snapshot existed
        assert "mse" not in r["history"][0]


def test_runs_are_deterministic(data, tmp_path):
    a = run(config(data, tmp_path, name="a", seeds=("1",)))
    b = run(config(data, tmp_path, name="b", seeds=("1",)))
    assert a["seeds"][0]["history"] == b["seeds"][0]["history"] and a["seeds"][0]["test"] == b["seeds"][0]["test"]


def test_zero_shot_is_the_prompts_accuracy(data, tmp_path):
    result = run(config(data, tmp_path, mode="zero-shot"))
    assert [r["seed"] for r in result["seeds"]] == [None]  # nothing sampled, nothing trained: one evaluation
    model, tok, _ = load_lm("tiny-gpt2")
    prompt = Prompt.build(result["template"], result["verbalizer"], tok, True, 2)
    from adaptune.experiments.common.data import load_dataset
    from adaptune.experiments.common.datasets import get_dataset
    test = load_dataset(get_dataset("sst-binary"), data).dev
    with torch.no_grad():
        logits = prompt.class_logits(model, prompt.encode(test, 32))
    expected = sum(int(p == int(e.label)) for p, e in zip(logits.argmax(-1).tolist(), test)) / len(test)
    assert result["seeds"][0]["test"] == pytest.approx(expected)


@pytest.mark.parametrize("model, mode", [("bert-tiny", "head"), ("tiny-bert-mlm", "prompt"), ("tiny-llama", "prompt")])
def test_every_kind_of_base(data, tmp_path, model, mode):
    result = run(config(data, tmp_path, model=model, mode=mode, seeds=("0",)))
    r, n = result["seeds"][0], result["data"]["test"]
    assert n == 16 and r["train"] == r["dev"] == 6 and r["trainable"] > 0  # the dev file less its 4 neutral rows
    for acc, size in [(r["test"], n), *((row["dev"], r["dev"]) for row in r["history"] if "dev" in row)]:
        assert 0.0 <= acc <= 1.0 and acc * size == pytest.approx(round(acc * size), abs=1e-9), (acc, size)  # k of n
    assert [row["step"] for row in r["history"]] == [1, 2, 3, 4] and all(math.isfinite(row["loss"]) for row in r["history"])
    assert r["best_dev"] == max(row["dev"] for row in r["history"] if "dev" in row)
    assert result["summary"]["test"] == {"mean": r["test"], "std": 0.0, "n": 1, "values": [r["test"]]}


def test_the_best_dev_step_is_selected(data, tmp_path):
    r = run(config(data, tmp_path, seeds=("0",), steps=6, eval_every=2, lr=5e-2))["seeds"][0]
    devs = {row["step"]: row["dev"] for row in r["history"] if "dev" in row}
    assert sorted(devs) == [2, 4, 6] and r["best_dev"] == max(devs.values())
    assert r["best_step"] == max(s for s, d in devs.items() if d == r["best_dev"])  # ties: the later step


def test_tapt_components_load_into_the_fine_tuning_run(data, tmp_path):
    out = tmp_path / "tapt"
    info = tapt(TaptConfig(out=str(out), model="tiny-gpt2", data_dir=data, steps=3, batch_size=4, max_length=16,
                           lr=1e-2))
    assert len(info["losses"]) == 3 and info["texts"] == 48  # the train file's sentences, neutral ones left out
    saved = load_file(str(out / "adaptation.safetensors"))
    model, _, _ = load_lm("tiny-gpt2")
    adaptation = _components(config(data, tmp_path, init_from=str(out)), model)
    state = adaptation.state_dict()
    assert set(state) == set(saved) and all(torch.equal(state[k], saved[k]) for k in saved)
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "B" in k.split(".")[-1])  # trained off LoRA's zero B
    result = run(config(data, tmp_path, init_from=str(out), seeds=("0",)))
    assert result["name"].endswith("tapt")


def test_masked_tapt_trains_the_mlm_loss(data, tmp_path):
    info = tapt(TaptConfig(out=str(tmp_path / "mlm"), model="tiny-bert-mlm", data_dir=data, steps=2, batch_size=4,
                           max_length=16))
    assert info["kind"] == "masked" and all(math.isfinite(v) and v > 0 for v in info["losses"])


def test_predict_batches_by_length_but_keeps_the_order(data):
    model, tok, _ = load_lm("bert-tiny")
    head = torch.nn.Linear(model.config.hidden_size, 2)
    score = scorer(model, None, head, Encoder(model, tok, 32), 32, torch.device("cpu"))
    from adaptune.experiments.common.data import Example
    examples = [Example("good " * n, None, 0.0) for n in (5, 1, 3)]
    whole = predict(score, [model, head], examples, batch_size=1)
    assert whole == predict(score, [model, head], examples, batch_size=3)
    assert accuracy([0, 1, 0], examples) == pytest.approx(2 / 3)


def test_clear_errors(data, tmp_path):
    with pytest.raises(ConfigError, match="regression"):
        FewShotConfig(dataset="sts")
    with pytest.raises(ConfigError, match="needs --self-ensemble"):
        FewShotConfig(self_distill=0.5)
    with pytest.raises(ConfigError, match="--mode"):
        FewShotConfig(mode="few")
    with pytest.raises(ConfigError, match="--seeds"):
        FewShotConfig(seeds=("0", "0"))
    with pytest.raises(ConfigError, match="zero-shot trains nothing"):
        FewShotConfig(mode="zero-shot", self_ensemble=3)
    with pytest.raises(ConfigError, match="no LM head"):
        run(config(data, tmp_path, model="bert-tiny"))
    with pytest.raises(ConfigError, match="single token"):
        run(config(data, tmp_path, verbalizer="zxqvbnw,great"))
    with pytest.raises(ConfigError, match="has none"):
        TaptConfig(out=str(tmp_path / "x"), method=FewShotMethod(name="full"))
    with pytest.raises(LoadError, match="not an `adaptune tapt` output"):
        run(config(data, tmp_path, init_from=str(tmp_path)))


def test_tapt_for_another_method_is_refused(data, tmp_path):
    out = tmp_path / "t"
    tapt(TaptConfig(out=str(out), model="tiny-gpt2", data_dir=data, steps=1, batch_size=2, max_length=8))
    with pytest.raises(ConfigError, match="same --model and method"):
        run(config(data, tmp_path, init_from=str(out), method=FewShotMethod(r=4)))


def test_report_tables_the_runs_with_their_spread(data, tmp_path):
    from typer.testing import CliRunner

    from adaptune.cli.app import app

    zero = run(config(data, tmp_path, mode="zero-shot"))
    tuned = run(config(data, tmp_path, self_ensemble=2))
    md = tmp_path / "table.md"
    out = CliRunner().invoke(app, ["report", zero["run_dir"], tuned["run_dir"], "--markdown", str(md)])
    assert out.exit_code == 0, out.output
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in md.read_text().splitlines()[2:]}
    s, e = tuned["summary"]["test"], tuned["summary"]["ensemble_test"]
    assert rows[tuned["name"]][7:9] == [f"{s['mean']:.3f} ± {s['std']:.3f}", f"{e['mean']:.3f} ± {e['std']:.3f}"]
    assert rows[tuned["name"]][5] == "self-ensemble 2" and rows[tuned["name"]][6] == "2"
    assert rows[zero["name"]][7] == f"{zero['seeds'][0]['test']:.3f}" and rows[zero["name"]][3] == "zero-shot"
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text(json.dumps({"format": "adaptune-fewshot/1", "name": "x"}))
    out = CliRunner().invoke(app, ["report", str(tmp_path / "broken")])
    assert out.exit_code != 0 and "adaptune run fewshot" in out.output


def test_the_commands_print_each_seed_and_refuse_bad_options(data, tmp_path):
    from typer.testing import CliRunner

    from adaptune.cli.app import app

    common = ["--model", "tiny-gpt2", "--data-dir", data, "--max-length", "32"]
    tapt_dir = tmp_path / "tapt"
    out = CliRunner().invoke(app, ["tapt", *common, "--steps", "2", "--batch-size", "4", "--out", str(tapt_dir)])
    assert out.exit_code == 0, out.output
    assert (tapt_dir / "adaptation.safetensors").is_file() and "saved to" in out.output
    out = CliRunner().invoke(app, ["run", "fewshot", *common, "--k", "3", "--seeds", "0,1", "--steps", "2",
                                   "--eval-every", "1", "--batch-size", "4", "--self-ensemble", "2",
                                   "--init-from", str(tapt_dir), "--out", str(tmp_path / "runs"), "--name", "cli"])
    assert out.exit_code == 0, out.output
    saved = json.loads((tmp_path / "runs" / "cli" / "results.json").read_text())
    for r in saved["seeds"]:
        assert f"seed {r['seed']}: best dev {r['best_dev']:.4f}" in out.output
        assert f"self-ensemble {r['ensemble_test']:.4f}" in out.output
    out = CliRunner().invoke(app, ["run", "fewshot", *common, "--mode", "nope", "--out", str(tmp_path / "runs")])
    assert out.exit_code != 0 and "valid modes are zero-shot, prompt, head" in out.output


def _tapt_dir(path, info):
    path.mkdir(parents=True)
    (path / "tapt.json").write_text(json.dumps(info))
    (path / "adaptation.safetensors").write_bytes(b"")
    return path


def _read_only(e):
    """Writing inside e/ro is refused (as on a read-only mount; chmod does not stop root)."""
    import os
    (e / "ro").mkdir()
    real = os.mkdir
    e_ro = str(e / "ro")

    def mkdir(path, *args, **kwargs):
        if str(path).startswith(e_ro):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)
    return mkdir


FEWSHOT = ["run", "fewshot", "--model", "tiny-gpt2", "--k", "2", "--seeds", "0", "--steps", "1"]
TAPT = ["tapt", "--model", "tiny-gpt2", "--steps", "1"]
BAD_CLI = {  # args ({tmp}: the case's directory), a fragment of the one-line error, what to prepare
    "fewshot-unknown-component-in-spec": (FEWSHOT + ["--spec", "attn=Bogus(3)"], "unknown component 'Bogus'", None),
    "fewshot-zero-shot-parses-the-spec": (FEWSHOT + ["--mode", "zero-shot", "--spec", "attn=Bogus(3)"],
                                           "unknown component 'Bogus'", None),
    "fewshot-spec-with-another-method": (FEWSHOT + ["--method", "adapter", "--spec", "attn=LoRA(2)"],
                                         "drop --method adapter or --spec", None),
    "tapt-spec-rank-0": (TAPT + ["--out", "{tmp}/t", "--spec", "attn=LoRA(0)"], "r must be a positive integer", None),
    "tapt-spec-with-another-method": (TAPT + ["--out", "{tmp}/t", "--method", "lora", "--spec", "attn=LoRA(2)"],
                                      "drop --method lora or --spec", None),
    "fewshot-model-missing": (FEWSHOT + ["--model", "{tmp}/nonexistent/dir"], "no such model directory", None),
    "fewshot-model-not-a-model-dir": (FEWSHOT + ["--model", "{tmp}"], "has no config.json", None),
    "tapt-model-missing": (TAPT + ["--out", "{tmp}/t", "--model", "/nonexistent/dir"], "no such model directory", None),
    "tapt-out-exists": (TAPT + ["--out", "{tmp}/t"], "give another --out, or --overwrite",
                        lambda tmp, mp: (tmp / "t").mkdir()),
    "tapt-out-read-only": (TAPT + ["--out", "{tmp}/ro/t"], "is not writable (permission denied)",
                           lambda tmp, mp: mp.setattr("os.mkdir", _read_only(tmp))),
    "fewshot-out-read-only": (FEWSHOT + ["--out", "{tmp}/ro/runs"], "is not writable (permission denied)",
                              lambda tmp, mp: mp.setattr("os.mkdir", _read_only(tmp))),
    "fewshot-init-from-without-method": (FEWSHOT + ["--init-from", "{tmp}/t"], "tapt.json: missing or malformed method",
                                         lambda tmp, mp: _tapt_dir(tmp / "t", {"format": "adaptune-tapt/1",
                                                                               "model": "tiny-gpt2"})),
    "fewshot-init-from-without-components": (FEWSHOT + ["--init-from", "{tmp}/t"], "adaptation.safetensors: missing",
                                             lambda tmp, mp: _tapt_dir(tmp / "t", {
                                                 "format": "adaptune-tapt/1", "model": "tiny-gpt2",
                                                 "method": "lora[r=8]"}).joinpath("adaptation.safetensors").unlink()),
}


@pytest.mark.parametrize("case", BAD_CLI)
def test_bad_fewshot_and_tapt_input_is_refused_before_anything_loads(case, data, tmp_path, monkeypatch):
    import sys

    from typer.testing import CliRunner

    from adaptune.cli.app import app

    def loaded(*args, **kwargs):
        raise AssertionError("loading started: the input should have been refused before")
    for module in ("adaptune.experiments.fewshot.run", "adaptune.experiments.fewshot.tapt"):
        monkeypatch.setattr(sys.modules[module], "load_lm", loaded)
        monkeypatch.setattr(sys.modules[module], "load_dataset", loaded)
    args, fragment, prepare = BAD_CLI[case]
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "run" in args and "--out" not in args:
        args += ["--out", str(tmp_path / "runs")]
    if prepare:
        prepare(tmp_path, monkeypatch)
    result = CliRunner().invoke(app, [*args, "--data-dir", data])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    errors = [line for line in result.output.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: ") and fragment in errors[0], result.output
    assert "--name" not in errors[0] or args[0] == "run"  # tapt has no --name


def test_spec_alone_selects_method_spec_in_tapt_and_fewshot(data, tmp_path):
    from typer.testing import CliRunner

    from adaptune.cli.app import app

    out = CliRunner().invoke(app, [*TAPT, "--data-dir", data, "--batch-size", "2", "--max-length", "8", "--out",
                                   str(tmp_path / "t"), "--spec", "attn=LoRA(2)"])
    assert out.exit_code == 0, out.output
    assert json.loads((tmp_path / "t" / "tapt.json").read_text())["method"] == "spec[attn=LoRA(2)]"
    cfg = FewShotConfig(method=FewShotMethod(spec="attn=LoRA(2)"))
    assert cfg.method.name == "spec" and FewShotMethod().name == "lora"
    with pytest.raises(ConfigError, match="drop --method adapter or --spec"):
        FewShotMethod(name="adapter", spec="attn=LoRA(2)")


def test_read_tapt_names_the_file_and_what_is_wrong(tmp_path):
    from adaptune.experiments.fewshot.tapt import read_tapt
    path = _tapt_dir(tmp_path / "t", {"format": "adaptune-tapt/1", "model": "tiny-gpt2", "method": 3})
    with pytest.raises(LoadError, match="tapt.json: missing or malformed method"):
        read_tapt(path, "tiny-gpt2", FewShotMethod())


def test_read_tapt_takes_the_label_of_a_tapt_run_saved_before_stack_became_spec(tmp_path):
    from adaptune.experiments.fewshot.tapt import read_tapt
    path = _tapt_dir(tmp_path / "t", {"format": "adaptune-tapt/1", "model": "tiny-gpt2",
                                      "method": "stack[attn=LoRA(2)]"})
    assert read_tapt(path, "tiny-gpt2", FewShotMethod(spec="attn=LoRA(2)"))["method"] == "stack[attn=LoRA(2)]"
    with pytest.raises(ConfigError, match=r"its components are stack\[attn=LoRA\(2\)\]"):
        read_tapt(path, "tiny-gpt2", FewShotMethod(spec="attn=LoRA(4)"))


def test_a_fewshot_results_json_is_checked_for_types(tmp_path):
    from adaptune.experiments.fewshot.report import check_fewshot
    result = {"format": "adaptune-fewshot/1", "name": "x", "data": {"test": 20}, "seeds": [{"seed": 0, "test": 0.5}],
              "config": {"dataset": "sst-binary", "model": "tiny-gpt2", "mode": "prompt", "method": "lora[r=8]"},
              "summary": {"test": {"mean": "0.5", "std": 0.0}}}
    with pytest.raises(LoadError, match="missing or malformed summary.test.mean"):
        check_fewshot(result, tmp_path / "results.json")
    result["summary"]["test"]["mean"] = 0.5
    assert check_fewshot(result, tmp_path / "results.json") is result
    result["seeds"][0]["test"] = None
    with pytest.raises(LoadError, match=r"seeds\[0\].test"):
        check_fewshot(result, tmp_path / "results.json")
