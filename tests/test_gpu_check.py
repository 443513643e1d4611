"""benchmarks/gpu_check.sh --rehearse: every phase of the one-shot GPU check, on the CPU with tiny shapes, so the
script a lent GPU machine runs cannot rot unnoticed."""
import json
import os
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from benchmarks import targets

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("1 environment", "2 correctness", "3 speed", "4 sweep-experts")
RETURNED = {"check.log", "environment.json", "build.log", "tests.log", "tests.xml", "results.tar", "bench.log"}


def rehearse(out: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "benchmarks/gpu_check.sh", "--rehearse", *args, str(out)], cwd=ROOT, text=True,
                          capture_output=True, timeout=900, env={**os.environ, "PYTHON": sys.executable, **env})


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    return rehearse(out), out


def test_every_phase_passes_and_writes_at_most_eight_files(rehearsal):
    done, out = rehearsal
    assert done.returncode == 0, done.stdout + done.stderr
    assert {p.name for p in out.iterdir()} == RETURNED and len(RETURNED) <= 8
    log = (out / "check.log").read_text()
    for phase in PHASES:
        assert f"phase {phase}: ok in" in log, log
    assert "every phase ok" in log


def test_the_environment_names_the_versions_and_the_build(rehearsal):
    _, out = rehearsal
    env = json.loads((out / "environment.json").read_text())
    assert env["device"] == "cpu" and env["build"]["cpu"]["ok"] and not env["build"]["cuda"]["ok"]
    assert all(env[name] for name in ("torch", "transformers", "peft", "python"))
    assert "ninja_required_version" in (out / "build.log").read_text()  # the build's flags and targets


def test_the_kernel_and_model_tests_ran_and_passed(rehearsal):
    _, out = rehearsal
    suite = ET.parse(out / "tests.xml").getroot().find("testsuite")
    assert int(suite.get("tests")) > 40 and int(suite.get("failures")) == 0 and int(suite.get("errors")) == 0
    files = {case.get("classname").removeprefix("tests.").split(".")[0]
             for case in ET.parse(out / "tests.xml").getroot().iter("testcase")}
    assert {"test_kernels", "test_kernels_routed", "test_kernels_half", "test_routing", "test_half_precision"} <= files


def test_results_hold_every_suite_and_a_verdict_for_every_target(rehearsal):
    _, out = rehearsal
    with tarfile.open(out / "results.tar") as tar:
        names = {Path(n).name for n in tar.getnames()}
        suites = ("ops", "train_step", "routing", "rank_sweep", "experts", "targets")
        assert {f"{s}-cpu-tiny.{ext}" for s in suites for ext in ("json", "md")} <= names
        checked = json.load(tar.extractfile("./targets-cpu-tiny.json"))
        sweep = json.load(tar.extractfile("./rank_sweep-cpu-tiny.json"))
    assert {r["target"] for r in checked["targets"]} == {t.text for t in targets.TARGETS if t.device == "cpu"}
    assert len(checked["environments"]) == 1
    methods = {r["method"] for r in sweep["records"] if "median_s" in r}
    assert {"full", "head-only", "adaptune-lora", "adaptune-dora"} <= methods


def test_a_phase_past_its_budget_is_recorded_and_the_next_still_runs(tmp_path):
    done = rehearse(tmp_path, GPU_CHECK_MAX_BUDGET="1")
    log = (tmp_path / "check.log").read_text()
    assert done.returncode == 1
    assert "phase 2 correctness: TIMED OUT" in log and "phase 4 sweep-experts: started" in log, log


def test_the_optional_seed001_phase_pretrains_a_base_and_packs_each_vae_run(tmp_path):
    done = rehearse(tmp_path, "--phases", "5")
    log = (tmp_path / "check.log").read_text()
    assert done.returncode == 0, done.stdout + done.stderr + log
    assert {p.name for p in tmp_path.iterdir()} == {"check.log", "seed001.tar"}  # phases 1-4 were not listed
    assert "phase 1 environment" not in log and "phase 5 seed001: ok in" in log
    with tarfile.open(tmp_path / "seed001.tar") as tar:
        pretrain = json.load(tar.extractfile("./pretrain.json"))
        runs = {v: json.load(tar.extractfile(f"./{v}/results.json")) for v in ("adavae", "lg", "finetune")}
        assert not [n for n in tar.getnames() if n.endswith(".safetensors") or n.startswith("./base")]
    assert pretrain["config"]["layers"] == 2 and pretrain["device"]["device"] == "cpu"
    for v, r in runs.items():
        assert r["config"]["base"].endswith("seed001/base") and r["config"]["device"] == "cpu"
        assert r["config"]["steps"] == 6 and r["config"]["batch_size"] == 8
        assert r["config"]["training"]["decoder_after"] == pytest.approx(1 / 6)
        assert 1 < r["test"]["ppl"] < 1e4 and f"seed001: {v} ended" in log
    assert runs["finetune"]["config"]["vae"]["finetune"] and runs["lg"]["config"]["vae"]["latent_gen"] == "pool"
    assert runs["adavae"]["config"]["vae"]["latent_gen"] == "attn"


@pytest.mark.parametrize("phases", ["6", "1,,2", "all", ""])
def test_a_bad_phase_list_is_refused_with_the_usage(tmp_path, phases):
    done = rehearse(tmp_path, "--phases", phases)
    assert done.returncode == 2 and "phases 1-5; default 1,2,3,4" in done.stderr and not (tmp_path / "check.log").exists()
