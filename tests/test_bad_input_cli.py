"""Bad input to the experiments and the CLI, as one table. Each case either fails with a clear error (its type,
or for the CLI exit status 2 and one line 'error: ...', holding a fragment of the message) and leaves every
file on disk as it was, or is handled correctly (checked by the case). A case marked trains=False must
be refused before training starts (the trainer raises if it is reached)."""
import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from typer.testing import CliRunner

import adaptune.experiments.multitask.run as multitask
from adaptune.cli.app import app
from adaptune.errors import ConfigError, LoadError
from adaptune.experiments.common.data import read_file
from adaptune.experiments.common.datasets import get_dataset
from adaptune.experiments.common.errors import DataError
from adaptune.experiments.common.methods import Method
from adaptune.experiments.multitask.eda import load_synonyms
from adaptune.experiments.multitask.run import ExperimentConfig, TrainingError, load_run
from adaptune.experiments.vae.config import RunConfig as VAERunConfig
from adaptune.experiments.vae.run import run as vae_run

runner = CliRunner()
WORDS = "good bad movie great awful plot fine dull bright dark film story acting".split()
SST_HEAD = "\tid\tsentence\tsentiment\n"
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks/results/multitask/per-run/head-only-seed0.json"


def sentence(i: int, n: int = 5) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n))


def sst_rows(n: int, start: int = 0) -> str:
    return "".join(f"{i}\tid{i}\t{sentence(i)}\t{i % 5}\n" for i in range(start, start + n))


@dataclass
class Env:
    model: Path  # a tiny BERT directory with MiniLM's tokenizer
    data: Path  # tiny sst, para, sts files
    bad: Path  # the same with a stray quote on line 7 of the SST train file
    tmp: Path = Path()  # the case's own directory (runs go to tmp/runs)
    monkeypatch: Any = None

    def cli(self, *args: str, name: str | None = "run", data: Path | None = None) -> list[str]:
        """`run multitask` on the tiny model and data: 3 steps of batch 4 (one per dataset)."""
        return ["run", "multitask", "--model", str(self.model), "--data-dir", str(data or self.data), "--out",
                str(self.tmp / "runs"), "--method", "lora", "--r", "2", "--epochs", "1", "--train-limit", "4",
                "--dev-limit", "8", "--max-length", "24", "--batch-size", "4", *(["--name", name] if name is not None else []),
                *args]

    def config(self, **kw: Any) -> ExperimentConfig:
        base = dict(model=str(self.model), data_dir=str(self.data), out=str(self.tmp / "runs"), epochs=1,
                    train_limit=4, dev_limit=8, max_length=24, batch_size=4, name="run")
        return ExperimentConfig(Method("lora", r=2), **{**base, **kw})


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    from transformers import AutoTokenizer, BertConfig, BertModel

    from adaptune.models import minilm_path
    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    torch.manual_seed(0)
    model = tmp_path_factory.mktemp("tiny-bert")
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         vocab_size=len(tok), max_position_embeddings=64)).save_pretrained(model)
    tok.save_pretrained(model)
    data = tmp_path_factory.mktemp("data")
    (data / "ids-sst-train.csv").write_text(SST_HEAD + sst_rows(12))
    (data / "ids-sst-dev.csv").write_text(SST_HEAD + sst_rows(8))
    pairs = "".join(f"{i}\tq{i}\t{sentence(i)}?\t{sentence(i + i % 2)}?\t{float(i % 2)}\n" for i in range(20))
    (data / "quora-dev.csv").write_text("\tid\tsentence1\tsentence2\tis_duplicate\n" + pairs)
    sts = "".join(f"{i}\ts{i}\t{sentence(i, 4)}\t{sentence(i + 1, 4)}\t{(i % 11) / 2}\n" for i in range(12))
    for f in ("sts-train.csv", "sts-dev.csv"):
        (data / f).write_text("\tid\tsentence1\tsentence2\tsimilarity\n" + sts)
    bad = tmp_path_factory.mktemp("bad")
    for f in data.iterdir():
        shutil.copy(f, bad / f.name)
    (bad / "ids-sst-train.csv").write_text(SST_HEAD + sst_rows(5) + '5\tid5\t"a stray quote\t3\n' + sst_rows(6, 6))
    return Env(model, data, bad)


def snapshot(*roots: Path) -> dict:
    """Every path under the roots (hidden ones too): 'dir', or the sha256 of the file's bytes."""
    out = {}
    for root in roots:
        for d, dirs, files in os.walk(root):
            out[d] = "dir"
            for f in files:
                out[os.path.join(d, f)] = hashlib.sha256(Path(d, f).read_bytes()).hexdigest()
    return out


def runs(e: Env) -> list[str]:
    return sorted(p.name for p in (e.tmp / "runs").iterdir())


def nan_at_step_2(e: Env) -> None:
    """The loss of the second step (dataset 'para', round robin) becomes NaN."""
    calls = []

    def loss_of(*args: Any) -> torch.Tensor:
        calls.append(1)
        loss = real(*args)
        return loss * float("nan") if len(calls) == 2 else loss
    real = multitask.loss_of
    e.monkeypatch.setattr(multitask, "loss_of", loss_of)


def write_results(e: Env, content: Any, name: str = "a") -> None:
    (e.tmp / "runs" / name).mkdir(parents=True)
    text = content if isinstance(content, str) else json.dumps(content)
    (e.tmp / "runs" / name / "results.json").write_text(text)


def finished_run(e: Env, name: str = "a") -> None:
    write_results(e, RESULTS.read_text(), name)


def checked_two_runs(e: Env, _: Any) -> None:
    names = runs(e)
    assert len(names) == 2 and all(n.startswith("lora-r2-seed0-") for n in names), names
    lrs = sorted(json.loads((e.tmp / "runs" / n / "results.json").read_text())["config"]["lr"] for n in names)
    assert lrs == [1e-3, 2e-3]


def checked_overwrite(e: Env, _: Any) -> None:
    assert runs(e) == ["run"]  # replaced in place: no hidden copies left beside it
    assert json.loads((e.tmp / "runs/run/results.json").read_text())["config"]["lr"] == 2e-3


def checked_equal(got: Any, expected: Any) -> None:
    assert got == expected


def checked_bom(_: Env, rows: Any) -> None:
    examples, skipped = rows
    assert [(x.a, x.b, x.label) for x in examples] == [("a b", "c d", 1.0), ("e", "f", 0.0)] and not skipped


def no_cuda(e: Env) -> None:
    e.monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def one_gpu(e: Env) -> None:
    e.monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    e.monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def fewshot(e: Env, *args: str) -> list[str]:
    """`run fewshot` with a head on the tiny BERT (it has no LM head) and the tiny data."""
    return ["run", "fewshot", "--model", str(e.model), "--mode", "head", "--data-dir", str(e.data), "--out",
            str(e.tmp / "runs"), "--quick", "--k", "2", "--seeds", "0", "--max-length", "24", *args]


def read_only(e: Env) -> None:
    """Writing inside tmp/ro is refused, as on a read-only mount (chmod does not stop root)."""
    (e.tmp / "ro").mkdir()
    real, ro = os.mkdir, str(e.tmp / "ro")

    def mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
        if str(path).startswith(ro):
            raise PermissionError(13, "Permission denied", str(path))
        real(path, *args, **kwargs)
    e.monkeypatch.setattr(os, "mkdir", mkdir)


@dataclass
class Case:
    id: str
    act: Callable[[Env], Any]  # a CLI argument list, or a call of the Python API
    error: type | None  # the API's error type; the CLI's is exit status 2; None: correct behaviour
    fragment: str = ""  # in the error message
    prepare: Callable[[Env], Any] | None = None  # run before the snapshot
    check: Callable[[Env, Any], None] | None = None  # correct behaviour: checks the outcome
    trains: bool = False  # training may start (else reaching it fails the case)


class CLI:
    """The error of a CLI case (its act returns an argument list): exit status 2 with a one-line message."""


MRPC = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\ta b\tc d\n0\t3\t4\te\tf\n"
CASES = [
    # data files
    Case("stray-quote-unclosed", lambda e: read_file(e.bad / "ids-sst-train.csv", get_dataset("sst")), DataError,
         "ids-sst-train.csv:7: a quote opened on this line is never closed"),
    Case("stray-quote-closed-lines-later",
         lambda e: read_file(e.tmp / "s.csv", get_dataset("sst")), DataError,
         "s.csv:7: a quoted field opened on this line runs on to line 9",
         prepare=lambda e: (e.tmp / "s.csv").write_text(SST_HEAD + sst_rows(5) + '5\tid5\t"stray\t3\n'
                                                        + sst_rows(1, 6) + '7\tid7\tend"\t2\n' + sst_rows(3, 8))),
    Case("stray-quote-cli", lambda e: e.cli(data=e.bad), CLI, "ids-sst-train.csv:7: a quote opened on this line"),
    Case("bom-header-reads", lambda e: read_file(e.tmp / "train.tsv", get_dataset("mrpc")), None,
         prepare=lambda e: (e.tmp / "train.tsv").write_text(MRPC, encoding="utf-8"), check=checked_bom),
    Case("bom-synonyms-read", lambda e: load_synonyms(e.tmp / "syn.txt"), None,
         prepare=lambda e: (e.tmp / "syn.txt").write_text("\ufeffgood fine\n", encoding="utf-8"),
         check=lambda e, table: checked_equal(table, {"good": ["fine"]})),
    # numbers
    Case("lr-nan-cli", lambda e: e.cli("--lr", "nan"), CLI, "lr (--lr) must be a positive finite number, got nan"),
    Case("lr-inf-cli", lambda e: e.cli("--lr", "inf"), CLI, "lr (--lr) must be a positive finite number, got inf"),
    Case("head-lr-negative-api", lambda e: e.config(head_lr=-1.0), ConfigError, "head_lr (--head-lr) must be"),
    Case("split-ratio-nan-api", lambda e: e.config(split_ratio=math.nan), ConfigError, "split_ratio (--split-ratio)"),
    Case("layer-lr-decay-0-cli", lambda e: e.cli("--layer-lr-decay", "0"), CLI, "must be a number in (0, 1], got 0"),
    Case("rank-0-cli", lambda e: e.cli("--r", "0"), CLI, "r (--r) must be an integer of at least 1"),
    # run names and destinations
    Case("name-dotdot-cli", lambda e: e.cli(name="../x"), CLI, "--name '../x' is not a plain directory name"),
    Case("name-empty-cli", lambda e: e.cli(name=""), CLI, "--name '' is not a plain directory name"),
    Case("name-slash-api", lambda e: e.config(name="a/b"), ConfigError, "'a/b' is not a plain directory name"),
    Case("out-is-a-file-cli", lambda e: e.cli() + ["--out", str(e.tmp / "f")], CLI, "is a file, not a directory",
         prepare=lambda e: (e.tmp / "f").write_text("x")),
    Case("same-name-twice-cli", lambda e: e.cli("--lr", "2e-3"), CLI, "exists: a run was saved under that name",
         prepare=lambda e: multitask.run(e.config())),
    Case("overwrite-foreign-dir-cli", lambda e: e.cli("--overwrite"), CLI, "also holds notes.txt",
         prepare=lambda e: finished_run(e, "run") or (e.tmp / "runs/run/notes.txt").write_text("mine")),
    Case("out-read-only-cli", lambda e: e.cli() + ["--out", str(e.tmp / "ro/runs")], CLI,
         "is not writable (permission denied)", prepare=read_only),
    # methods: --spec is method 'spec's composition, parsed when the method is made
    Case("spec-with-another-method-api", lambda e: Method("lora", spec="attn=LoRA(2)"), ConfigError,
         "drop --method lora or --spec"),
    Case("spec-with-another-method-cli", lambda e: e.cli("--spec", "attn=LoRA(2)"), CLI,
         "drop --method lora or --spec"),
    Case("spec-unknown-component-api", lambda e: Method(spec="attn=Bogus(3)"), ConfigError,
         "unknown component 'Bogus'"),
    Case("spec-rank-0-api", lambda e: Method(spec="attn=LoRA(0)"), ConfigError, "r must be a positive integer"),
    Case("runs-differing-in-lr-get-two-dirs", lambda e: [multitask.run(e.config(name=None, lr=lr))
                                                          for lr in (1e-3, 2e-3)], None, check=checked_two_runs,
         trains=True),
    Case("overwrite-replaces-the-run", lambda e: multitask.run(e.config(lr=2e-3, overwrite=True)), None,
         prepare=lambda e: multitask.run(e.config()), check=checked_overwrite, trains=True),
    # a diverging run
    Case("nan-loss-api", lambda e: nan_at_step_2(e) or multitask.run(e.config()), TrainingError,
         "at step 2 of 3 (epoch 1, dataset 'para'): the loss is nan", trains=True),
    Case("nan-loss-cli", lambda e: nan_at_step_2(e) or e.cli(), CLI, "nothing is saved", trains=True),
    Case("nan-loss-keeps-the-old-run", lambda e: nan_at_step_2(e) or e.cli("--overwrite"), CLI, "dataset 'para'",
         prepare=lambda e: multitask.run(e.config()), trains=True),
    # devices: one check for every command's --device, before anything is loaded
    Case("device-cuda-without-cuda-fewshot-cli", lambda e: fewshot(e, "--device", "cuda"), CLI,
         "--device 'cuda': torch", prepare=no_cuda),
    Case("device-cuda-without-cuda-tapt-cli", lambda e: ["tapt", "--out", str(e.tmp / "t"), "--model", "tiny-bert-mlm",
                                                         "--data-dir", str(e.data), "--steps", "1", "--device",
                                                         "cuda"], CLI,
         "available devices here: cpu", prepare=no_cuda),
    Case("device-cuda-without-cuda-multitask-cli", lambda e: e.cli("--device", "cuda"), CLI,
         "available devices here: cpu", prepare=no_cuda),
    Case("device-cuda-without-cuda-api", lambda e: e.config(device="cuda").resolved(), ConfigError,
         "available devices here: cpu", prepare=no_cuda),
    Case("device-cuda-without-cuda-vae-cli", lambda e: ["run", "vae", "--quick", "--base", "tiny-gpt2", "--out",
                                                        str(e.tmp / "v"), "--device", "cuda"], CLI,
         "available devices here: cpu", prepare=no_cuda),
    Case("device-cuda-without-cuda-vae-api", lambda e: vae_run(VAERunConfig(base="tiny-gpt2", quick=True, device="cuda",
                                                                            out=str(e.tmp / "v"))), ConfigError,
         "available devices here: cpu", prepare=no_cuda),
    Case("device-typo-vae-api", lambda e: VAERunConfig(device="gpu"), ConfigError,
         "--device must be cpu, cuda or cuda:N, got 'gpu'"),
    Case("device-past-the-gpus-cli", lambda e: fewshot(e, "--device", "cuda:1"), CLI,
         "--device 'cuda:1': this machine has 1 CUDA device(s); available devices here: cpu, cuda, cuda:0",
         prepare=one_gpu),
    Case("device-typo-cli", lambda e: fewshot(e, "--device", "gpu"), CLI, "--device 'gpu' is not a device"),
    # reports and models
    Case("report-wrong-schema", lambda e: ["report", str(e.tmp / "runs/a"), "--plot", str(e.tmp / "p.png")], CLI,
         "not a multitask results.json (a JSON list)", prepare=lambda e: write_results(e, [1, 2])),
    Case("report-missing-keys", lambda e: ["report", str(e.tmp / "runs/a"), "--plot", str(e.tmp / "p.png")], CLI,
         "missing or malformed name, label, method", prepare=lambda e: write_results(e, {"format": "adaptune-multitask/1",
                                                                              "tasks": {}})),
    Case("report-plot-is-a-dir", lambda e: ["report", str(e.tmp / "runs/a"), "--plot", str(e.tmp / "runs")], CLI,
         "is a directory; give a file path", prepare=finished_run),
    Case("report-markdown-is-a-dir", lambda e: ["report", str(e.tmp / "runs/a"), "--plot", str(e.tmp / "p.png"),
                                                "--markdown", str(e.tmp)], CLI, "is a directory", prepare=finished_run),
    Case("load-run-wrong-schema", lambda e: load_run(e.tmp / "runs/a"), LoadError, "not a multitask results.json",
         prepare=lambda e: write_results(e, {"format": "other"})),
    Case("model-dir-without-config-cli", lambda e: e.cli() + ["--model", str(e.tmp)], CLI, "no config.json"),
    Case("inspect-dir-without-config", lambda e: ["inspect", str(e.tmp)], CLI, "no config.json, so not a Hugging"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    e = Env(env.model, env.data, env.bad, tmp_path, monkeypatch)
    if case.prepare:
        case.prepare(e)
    if not case.trains:
        def no_training(*args: Any, **kw: Any) -> None:
            raise AssertionError("training started: the input should have been refused before")
        monkeypatch.setattr(multitask, "train", no_training)
    before = snapshot(tmp_path, env.data, env.bad, env.model)
    if case.error is None:
        case.check(e, case.act(e))
        return
    if case.error is CLI:
        result = runner.invoke(app, case.act(e))
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
        errors = [line for line in result.output.splitlines() if "error:" in line]
        assert len(errors) == 1 and errors[0].startswith("error: "), result.output  # one line
        assert case.fragment in errors[0], errors[0]
    else:
        with pytest.raises(case.error) as raised:
            case.act(e)
        assert case.fragment in str(raised.value)
    assert snapshot(tmp_path, env.data, env.bad, env.model) == before  # nothing written, moved or removed
