"""--quantize on `run multitask`, `run fewshot`, `tapt` and `run vae` (bitsandbytes on the CPU): each run trains its
components on a quantized frozen base, records the quantization, reloads onto a base quantized alike; bad values,
and training the base itself are refused; results saved before the option load and
keep their run names.

The tiny BERT has hidden size 64: bitsandbytes' 4-bit CPU inference path packs each weight row in blocks of 64."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("bitsandbytes")

from adaptune.cli.app import app  # noqa: E402
from adaptune.errors import ConfigError, LoadError  # noqa: E402

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
COMMITTED = {"multitask": ROOT / "benchmarks/results/multitask/per-run/head-only-seed0.json",
             "fewshot": ROOT / "benchmarks/results/fewshot/per-run/cfimdb-prompt-lora.json",
             "vae": ROOT / "benchmarks/results/vae/per-run/adavae.json"}
WORDS = "good bad movie great awful plot fine dull bright dark film story acting".split()
SST_HEAD = "\tid\tsentence\tsentiment\n"


def _sentence(i: int, n: int = 6) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n))


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    from transformers import AutoTokenizer, BertConfig, BertModel

    from adaptune.models import minilm_path
    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny-bert")
    BertModel(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                         vocab_size=len(tok), max_position_embeddings=64)).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """SST-5 files: multitask's sst, and few-shot's sst-binary (0-1 negative, 3-4 positive: 10 of each)."""
    d = tmp_path_factory.mktemp("data")
    rows = "".join(f"{i}\tid{i}\t{_sentence(i)} .\t{i % 5}\n" for i in range(24))
    (d / "ids-sst-train.csv").write_text(SST_HEAD + rows)
    (d / "ids-sst-dev.csv").write_text(SST_HEAD + "".join(rows.splitlines(True)[:12]))
    return str(d)


def multitask_args(bert, data, out, *extra):
    return ["run", "multitask", "--model", bert, "--data-dir", data, "--tasks", "sst", "--method", "lora", "--r", "2",
            "--epochs", "1", "--train-limit", "4", "--dev-limit", "8", "--max-length", "24", "--batch-size", "4",
            "--out", str(out), *extra]


FEWSHOT = ["run", "fewshot", "--model", "tiny-llama", "--k", "2", "--seeds", "0", "--steps", "2", "--eval-every", "1",
           "--batch-size", "4", "--max-length", "32", "--test-limit", "8"]
TAPT = ["tapt", "--model", "tiny-llama", "--steps", "2", "--batch-size", "4", "--max-length", "16"]
VAE = ["run", "vae", "--base", "tiny-llama", "--quick", "--steps", "2", "--batch-size", "4", "--eval-limit", "4",
       "--eval-samples", "2", "--latent-dim", "4", "--adapter-dim", "4"]


def ok(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


def one_error(args) -> str:
    """The one-line error of a command refused with exit status 2."""
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    return errors[0]


def command(*path):
    import typer
    c = typer.main.get_command(app)
    for name in path:
        c = c.commands[name]
    return c


@pytest.mark.parametrize("path", [("run", "multitask"), ("run", "fewshot"), ("tapt",), ("run", "vae")])
def test_every_command_has_the_option_naming_its_values(path):
    (param,) = [p for p in command(*path).params if p.name == "quantize"]
    assert param.opts == ["--quantize"] and param.default is None and param.metavar == "nf4|fp4|int8"
    assert "default: none" in param.help


def test_the_values_are_those_adaptune_quantize_makes():
    from adaptune.experiments.common.quantize import QUANTIZATIONS
    from adaptune.quantized import SCHEMES
    assert QUANTIZATIONS == SCHEMES


def test_multitask_on_a_quantized_base_records_it_and_reloads_quantized(bert, data, tmp_path):
    from adaptune.experiments.multitask.config import ExperimentConfig, default_name
    from adaptune.experiments.multitask.run import load_run, predict_run
    from adaptune.models import load_model

    ok(multitask_args(bert, data, tmp_path, "--quantize", "nf4"))
    (run_dir,) = tmp_path.iterdir()
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["quantize"] == saved["config"]["quantize"] == "nf4"
    assert saved["quantized_layers"] == {"Linear4bit": 13}  # q, k, v, o, up, down of 2 layers, and the pooler
    assert saved["params"]["base"] == sum(p.numel() for p in load_model(bert).parameters())  # as in float
    assert saved["label"] == "lora[r=2]" and "--quantize nf4" in saved["command"]
    cfg = ExperimentConfig.from_dict(saved["config"])
    assert run_dir.name == default_name(cfg) != default_name(dataclasses.replace(cfg, quantize=None))
    _, model, _, _, _ = load_run(run_dir)  # the adapters load onto a base quantized as the run's was
    assert type(model.encoder.layer[0].attention.self.query).__name__ == "Linear4bit"
    assert predict_run(run_dir) == json.loads((run_dir / "predictions.json").read_text())
    md = tmp_path / "report.md"
    ok(["report", str(run_dir), "--plot", str(tmp_path / "r.png"), "--markdown", str(md)])
    assert "| lora[r=2, nf4] |" in md.read_text()


def test_tapt_and_fewshot_on_a_quantized_base(data, tmp_path):
    ok([*TAPT, "--data-dir", data, "--out", str(tmp_path / "tapt"), "--quantize", "fp4"])
    info = json.loads((tmp_path / "tapt" / "tapt.json").read_text())
    assert info["quantize"] == info["config"]["quantize"] == "fp4" and info["quantized_layers"] == {"Linear4bit": 14}
    ok([*FEWSHOT, "--data-dir", data, "--out", str(tmp_path / "runs"), "--quantize", "fp4", "--init-from",
        str(tmp_path / "tapt")])  # the TAPT components load onto a base quantized alike
    (run_dir,) = (tmp_path / "runs").iterdir()
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["quantize"] == saved["config"]["quantize"] == "fp4" and saved["quantized_layers"] == {"Linear4bit": 14}
    assert run_dir.name.endswith("-tapt-fp4") and "quantized_layers" not in saved["seeds"][0]
    md = tmp_path / "report.md"
    ok(["report", str(run_dir), "--markdown", str(md)])
    assert "| tiny-llama (fp4) |" in md.read_text()


def test_vae_on_a_quantized_base_records_it_and_reloads_quantized(tmp_path):
    from adaptune.experiments.vae.classify import classify
    from adaptune.experiments.vae.run import load_run, reevaluate

    ok([*VAE, "--out", str(tmp_path), "--quantize", "int8"])
    run_dir = tmp_path / "vae-yelp-tiny-llama-psa-attn-ffn-parallel-fb0.5-int8-quick"
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["quantize"] == saved["config"]["quantize"] == "int8"
    assert saved["quantized_layers"] == {"Linear8bitLt": 14}
    again, test = reevaluate(run_dir), saved["test"]
    assert again.pop("au_variances") == pytest.approx(test.pop("au_variances"), rel=1e-6, abs=1e-9)
    assert again == pytest.approx(test, rel=1e-6, abs=1e-6)
    vae, tok, _ = load_run(run_dir)
    assert type(vae.base.model.layers[0].self_attn.q_proj).__name__ == "Linear8bitLt"
    with pytest.raises(ConfigError, match="base is quantized"):
        classify(vae, tok, None, methods=["finetune"], sizes=[10], seeds=1)


@pytest.mark.parametrize("args", [["run", "multitask"], FEWSHOT, TAPT + ["--out", "{tmp}/t"], VAE],
                         ids=["multitask", "fewshot", "tapt", "vae"])
def test_an_unknown_value_is_refused_naming_the_valid_ones(args, tmp_path):
    error = one_error([a.replace("{tmp}", str(tmp_path)) for a in args] + ["--quantize", "nf3"])
    assert "--quantize 'nf3' is not a quantization: give nf4, fp4 or int8" in error


@pytest.mark.parametrize("args, what, works", [
    (["run", "multitask", "--method", "full"], "--method full", "--method lora, dora"),
    (FEWSHOT + ["--method", "full"], "--method full", "--method lora, dora"),
    (VAE + ["--finetune"], "--finetune", "the VAE's adapters")], ids=["multitask", "fewshot", "vae"])
def test_training_the_base_itself_is_refused(args, what, works, tmp_path):
    error = one_error([*args, "--out", str(tmp_path), "--quantize", "int8"])
    assert f"--quantize int8: {what} trains the base's own weights" in error and works in error
    assert "drop --quantize" in error and not any(tmp_path.iterdir())


def test_training_the_base_is_refused_by_the_configs_too():
    from adaptune.experiments.common.methods import Method
    from adaptune.experiments.fewshot.config import FewShotConfig, FewShotMethod
    from adaptune.experiments.multitask.config import ExperimentConfig
    from adaptune.experiments.vae.config import RunConfig, VAEConfig
    for make in (lambda q: ExperimentConfig(Method("full"), quantize=q),
                 lambda q: FewShotConfig(method=FewShotMethod(name="full"), quantize=q),
                 lambda q: RunConfig(vae=VAEConfig(finetune=True), quantize=q)):
        make(None)
        with pytest.raises(ConfigError, match="trains the base's own weights"):
            make("nf4")
    FewShotConfig(method=FewShotMethod(name="full"), mode="zero-shot", quantize="nf4")  # trains nothing


def test_trainable_on_a_quantized_projection_is_refused_before_training(bert, data, tmp_path):
    error = one_error(multitask_args(bert, data, tmp_path, "--method", "spec", "--spec", "pooler.dense=Trainable()",
                                     "--quantize", "nf4"))
    assert error.startswith("error: --quantize nf4: Trainable") and "LoRA, DoRA or BitFit" in error
    assert not any(tmp_path.iterdir())


def test_gradients_flow_through_a_quantized_layer_after_an_evaluation():
    """Few-shot runs evaluate between training steps: the 4-bit layers must keep their backward."""
    from adaptune import LoRA, attach
    from adaptune.experiments.common.causal import load_base
    from adaptune.experiments.common.quantize import quantize_base

    model, _ = load_base("tiny-llama")
    quantize_base(model, "nf4")
    adaptation = attach(model, {"attn": LoRA(2)})
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))

    def grads():
        model.train()
        model.zero_grad(set_to_none=True)
        model(input_ids=ids).logits.square().mean().backward()
        return [p.grad.clone() for p in adaptation.parameters()]  # A and B: B starts at 0, A learns through it
    before = grads()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    after = grads()
    assert all(torch.equal(a, b) for a, b in zip(before, after)) and any(a.abs().sum() > 0 for a in before)


def test_gpt2s_conv1d_projections_quantize_too(data, tmp_path):
    ok([*FEWSHOT, "--model", "tiny-gpt2", "--data-dir", data, "--out", str(tmp_path), "--quantize", "nf4"])
    (run_dir,) = tmp_path.iterdir()
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["quantize"] == "nf4" and saved["quantized_layers"] == {"Linear4bit": 8}  # c_attn, c_proj, c_fc, mlp


def test_results_saved_before_the_option_load_and_keep_their_names(tmp_path):
    """The committed results.json files have no quantize key: a float base, default names hashed as before."""
    from adaptune.experiments.common.methods import Method
    from adaptune.experiments.fewshot import report as fewshot
    from adaptune.experiments.multitask.config import ExperimentConfig, default_name
    from adaptune.experiments.multitask.report import run_label
    from adaptune.experiments.multitask.runs import check_results
    from adaptune.experiments.vae import report as vae
    from adaptune.experiments.vae.results import check_vae

    saved = {k: json.loads(p.read_text()) for k, p in COMMITTED.items()}
    assert all("quantize" not in r["config"] for r in saved.values())
    assert ExperimentConfig.from_dict(check_results(saved["multitask"], COMMITTED["multitask"])["config"]).quantize is None
    assert run_label(saved["multitask"]) == "head-only"
    assert fewshot.base(fewshot.check_fewshot(saved["fewshot"], COMMITTED["fewshot"])["config"]) == "smollm2-135m"
    assert vae.base(check_vae(saved["vae"], COMMITTED["vae"])["config"]) == "small-gpt2"
    # the names of runs saved before --quantize (hashes of every setting) stay theirs
    assert default_name(ExperimentConfig(data_dir="data", tasks=("sst", "para", "sts"))) == \
        "lora+adapter-r12-dim64-seed0-fa8741ff"
    assert default_name(ExperimentConfig(Method("lora", r=4), data_dir="data", quick=True)) == "lora-r4-seed0-106e4ef8"
    for d in (tmp_path / "old", tmp_path / "bad"):
        d.mkdir()
    (tmp_path / "old" / "results.json").write_text(COMMITTED["multitask"].read_text())
    md = tmp_path / "r.md"
    ok(["report", str(tmp_path / "old"), "--plot", str(tmp_path / "r.png"), "--markdown", str(md)])
    assert "| head-only |" in md.read_text()
    bad = {**saved["multitask"], "config": {**saved["multitask"]["config"], "quantize": 4}}
    with pytest.raises(LoadError, match="malformed config.quantize"):
        check_results(bad, tmp_path / "bad" / "results.json")
