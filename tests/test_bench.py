"""The benchmark suites on tiny models: results files, their records, and that compared runs do the same work.

No timing is asserted: speed targets are checked by the benchmarks themselves (benchmarks/targets.py).
"""
import json

import pytest

from benchmarks import experts, quantized, run, targets

STEMS = ("train_step-cpu-tiny", "ops-cpu-tiny", "rank_sweep-cpu-tiny", "routing-cpu-tiny", "quantized-cpu-tiny",
         "experts-cpu-tiny")


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    for suite in run.SUITES:
        run.run_suite(suite, "cpu", quick=True, tiny=True, warm=0, reps=1, out=out, log=lambda line: None)
    run.check_targets("cpu", tiny=True, out=out, log=lambda line: None)
    return out


def load(out, stem):
    return json.loads((out / f"{stem}.json").read_text())


def test_every_results_file_says_where_and_when_and_holds_measured_records(out):
    for stem in STEMS:
        result = load(out, stem)
        env = result["environment"]
        assert env["device"] == "cpu" and env["threads"] == 2
        assert all(env[key] for key in ("device_name", "torch", "date", "adaptune"))
        markdown = (out / f"{stem}.md").read_text()
        assert env["torch"] in markdown and env["date"] in markdown and "threads: 2" in markdown
        assert result["records"]
        for record in result["records"]:
            assert "error" not in record, record.get("error")
            if "skipped" in record:  # kernel cases where kernels are not built
                continue
            assert record["runs"] == 1 and record["median_s"] > 0 and record["peak_mb"] > 0
            frozen = "frozen" in (record.get("op"), record.get("method"))  # the floor: no adapter
            assert (record["trainable"] > 0 or frozen) and record["tokens_per_s"] > 0


def test_routed_and_single_task_batches_hold_the_same_components(out):
    records = {r["name"]: r for r in load(out, "routing-cpu-tiny")["records"]}
    for method in ("lora", "dora", "adapter"):
        path = "kernels" if f"{method} fwd single [kernels]" in records else "reference"
        single, mixed = records[f"{method} fwd single [{path}]"], records[f"{method} fwd mixed T=8 [{path}]"]
        assert single["trainable"] == mixed["trainable"] == 8 * records[f"{method} fwd mixed T=1 [{path}]"]["trainable"]
    assert records["lora fwd peft adapter_names T=8"]["trainable"] == records["lora fwd mixed T=8 [" + path + "]"][
        "trainable"]


def test_peft_and_adaptune_train_the_same_parameters(out):
    train = load(out, "train_step-cpu-tiny")
    pairs = {(c["model"], c["b"].split()[1]) for c in train["checks"]}
    assert pairs == {(m, p) for m in ("bert-tiny", "gpt2-tiny", "llama-tiny") for p in ("peft-lora", "peft-dora")}
    assert all(c["equal"] and c["a_trainable"] > 0 for c in train["checks"])
    ops = {r["name"]: r for r in load(out, "ops-cpu-tiny")["records"]}
    for op in ("lora", "dora"):
        assert ops[f"{op} 256 adaptune [reference]"]["trainable"] == ops[f"{op} 256 peft"]["trainable"]


def test_expert_lora_trains_what_peft_trains_on_every_expert(out):
    result = load(out, "experts-cpu-tiny")
    records = {(r["impl"], r["method"], r["path"]): r for r in result["records"]}
    assert set(records) == {case[:3] for case in experts.CASES}
    hidden, inter, n, _, _ = experts.SHAPES["tiny"]
    lora = n * experts.R * (hidden + 2 * inter) + n * experts.R * (inter + hidden)  # gate_up, down
    assert records["peft", "lora", "-"]["trainable"] == lora
    assert records["adaptune", "lora", "grouped"]["trainable"] == records["adaptune", "lora", "reference"][
        "trainable"] == lora
    assert records["adaptune", "dora", "grouped"]["trainable"] == lora + n * (2 * inter + hidden)  # magnitudes
    assert result["checks"] and all(c["equal"] for c in result["checks"])
    assert records["transformers", "frozen", "grouped_mm"]["trainable"] == 0


def test_the_rank_sweep_grows_with_r_and_full_trains_everything(out):
    records = {r["name"]: r for r in load(out, "rank_sweep-cpu-tiny")["records"]}
    dora = [records[f"bert-tiny adaptune-dora r={r} [kernels]"]["trainable"] for r in (1, 4)]
    assert dora[0] < dora[1] < records["bert-tiny full"]["trainable"] == records["bert-tiny full"]["total_params"]
    assert records["bert-tiny head-only"]["trainable"] == 128 * 5 + 5  # the new head alone


def test_quantized_bases_store_less_and_train_what_peft_trains(out):
    result = load(out, "quantized-cpu-tiny")
    records = {(r["base"], r["method"]): r for r in result["records"] if not r["checkpointing"]}
    assert set(records) == set(quantized.CASES)
    checkpointed = {(r["base"], r["method"]): r for r in result["records"] if r["checkpointing"]}
    assert set(checkpointed) == set(quantized.CHECKPOINTED)
    for case, r in checkpointed.items():  # the same model and work; the activations recomputed
        assert (r["trainable"], r["weights_mb"]) == (records[case]["trainable"], records[case]["weights_mb"])
    stored = {base: records[(base, "adaptune-lora")]["weights_mb"] for base in ("float", "nf4", "int8")}
    assert stored["nf4"] < stored["int8"] < stored["float"]
    assert len({records[(base, "adaptune-lora")]["trainable"] for base in stored}) == 1  # the same LoRA on each
    assert {c["b"].split(" ", 2)[2] for c in result["checks"]} == {"peft-lora", "peft-dora",
                                                                    "peft-lora +checkpointing"}
    assert all(c["equal"] and c["a_trainable"] > 0 for c in result["checks"])
    # each case measured again in a process where glibc unmaps freed memory (a tiny model's step may stay under
    # the peak its imports reached: 0 over the baseline)
    for r in result["records"]:
        assert r["live_peak_over_base_mb"] >= 0.0, r["name"]
    assert "live over baseline MB" in (out / "quantized-cpu-tiny.md").read_text()


def test_quantized_memory_targets_read_the_peak_over_the_process_baseline_on_cpu():
    def rec(name, base, method, over, median=1.0, live=None):
        return {"name": name, "model": "llama-8l", "base": base, "method": method, "median_s": median,
                "peak_mb": 9000.0 + over, "peak_over_base_mb": over, "live_peak_over_base_mb": live or over / 2}

    def verdicts(records, live=False):
        rows = [r for r in targets.check({"quantized": {"records": records}}, "cpu") if r["suite"] == "quantized"
                and ("live peak" in r["target"]) == live]
        return [(r.get("a"), r.get("value"), r["verdict"]) for r in rows]

    records = [rec("f", "float", "adaptune-lora", 1000.0), rec("q", "nf4", "adaptune-lora", 300.0, live=100.0),
               rec("p", "nf4", "peft-lora", 400.0), rec("d", "nf4", "adaptune-dora", 300.0, median=1.2)]
    assert verdicts(records) == [("q", pytest.approx(0.3), "PASS"), ("q", pytest.approx(0.75), "PASS"),
                                 (None, None, "MISSING"), ("q", 1.0, "PASS"), ("d", 1.2, "FAIL")]
    # the live peak (freed memory unmapped) has targets of its own, read from its own field
    assert verdicts(records, live=True) == [("q", pytest.approx(0.2), "PASS"), ("q", pytest.approx(0.5), "PASS"),
                                            (None, None, "MISSING")]
    # with checkpointing: each nf4 record against the yardstick of its own setting, never the other's
    for r in records:
        r["checkpointing"] = False
    records += [{**rec("fc", "float", "adaptune-lora", 500.0), "checkpointing": True},
                {**rec("qc", "nf4", "adaptune-lora", 100.0), "checkpointing": True},
                {**rec("pc", "nf4", "peft-lora", 100.0, median=2.0), "checkpointing": True}]
    assert verdicts(records) == [
        ("q", pytest.approx(0.3), "PASS"), ("qc", pytest.approx(0.2), "PASS"), ("q", pytest.approx(0.75), "PASS"),
        ("qc", 1.0, "PASS"), (None, None, "MISSING"), ("q", 1.0, "PASS"), ("qc", 0.5, "PASS"), ("d", 1.2, "FAIL")]
    # the 24-layer model's targets read its own two records only, never the 8-layer model's
    deep = [{**rec(name, base, "adaptune-lora", over), "model": "llama-24l", "checkpointing": True}
            for name, base, over in (("F", "float", 4000.0), ("Q", "nf4", 1000.0))]
    rows = [r for r in targets.check({"quantized": {"records": records + deep}}, "cpu") if r["suite"] == "quantized"]
    assert [(r["a"], r["b"], r["metric"], r["value"], r["verdict"]) for r in rows if "24 layers" in r["target"]] == [
        ("Q", "F", "peak_over_base_mb", pytest.approx(0.25), "PASS"),
        ("Q", "F", "live_peak_over_base_mb", pytest.approx(0.25), "PASS")]


def test_targets_file_lists_every_cpu_target(out):
    checked = load(out, "targets-cpu-tiny")["targets"]
    assert {r["target"] for r in checked} == {t.text for t in targets.TARGETS if t.device == "cpu"}


def test_target_verdicts_from_records():
    def rec(name, method, median, path="-"):
        return {"name": name, "model": "bert-base", "method": method, "path": path, "median_s": median}
    results = {"train_step": {"records": [rec("p-dora", "peft-dora", 3.0), rec("p-lora", "peft-lora", 2.0),
                                          rec("a-dora", "adaptune-dora", 2.5, "reference"),
                                          rec("a-lora", "adaptune-lora", 2.2, "reference")]}}
    verdicts = {r["target"]: r for r in targets.check(results, "cpu")}
    assert verdicts["BERT-base step: adaptune DoRA <= 0.9 x PEFT DoRA"]["verdict"] == "PASS"  # 2.5 / 3.0
    assert verdicts["BERT-base step: adaptune LoRA <= 1.0 x PEFT LoRA"]["verdict"] == "FAIL"  # 2.2 / 2.0
    assert verdicts["BERT-base step: adaptune DoRA <= 1.05 x adaptune LoRA"]["value"] == pytest.approx(2.5 / 2.2)
    assert all(r["verdict"] == "MISSING" for r in verdicts.values() if r["suite"] == "ops")
    assert all(r["verdict"] == "MISSING" for r in targets.check({}, "cuda"))


def test_side_by_side_times_give_the_median_of_per_round_ratios():
    """Rounds 2 and 3 ran on a slower machine: per round, a is 0.9 x b; the medians' ratio says 1.2."""
    a = {"name": "a", "model": "bert-base", "method": "adaptune-lora", "path": "kernels", "median_s": 2.7,
         "times_s": [1.8, 2.7, 2.7]}
    b = {"name": "b", "model": "bert-base", "method": "peft-lora", "path": "-", "median_s": 2.25,
         "times_s": [2.0, 3.0, 3.0]}
    (row,) = [r for r in targets.check({"train_step": {"records": [a, b]}}, "cpu") if "LoRA <= 1.0" in r["target"]]
    assert row["value"] == pytest.approx(0.9) and row["ratio_of_medians"] == pytest.approx(1.2)
    assert row["verdict"] == "PASS"
    assert targets.paired_ratio(a, {**b, "times_s": [2.0, 3.0]}) is None  # not the same rounds


def test_bench_command_rejects_an_unknown_suite(tmp_path):
    from typer.testing import CliRunner

    from adaptune.cli.app import app
    result = CliRunner().invoke(app, ["bench", "--suite", "nope", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "train, ops, sweep, routing, quantized, experts or all" in result.output
    assert not any(tmp_path.iterdir())


def test_bench_command_runs_only_from_a_checkout(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from adaptune.cli.app import app
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["bench", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "runs from a checkout" in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()


def test_kernel_cases_that_cannot_run_are_listed_as_skipped_and_their_targets_read_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "probe_kernels", lambda device: "no compiler here")
    result = run.run_suite("ops", "cpu", quick=True, tiny=True, warm=0, reps=1, out=tmp_path, log=lambda line: None)
    kernel = [r for r in result["records"] if r.get("path") == "kernels"]
    assert kernel and all(r["skipped"] == "no compiler here" and "median_s" not in r for r in kernel)
    assert all("median_s" in r for r in result["records"] if r.get("path") != "kernels")
    assert "skipped: no compiler here" in (tmp_path / "ops-cpu-tiny.md").read_text()
    rows = [r for r in run.check_targets("cpu", tiny=True, out=tmp_path, log=lambda line: None) if r["suite"] == "ops"]
    assert {r["verdict"] for r in rows if "[kernels]" in r.get("a", "")} == {"MISSING"}
    assert {r["why"] for r in rows if "[kernels]" in r.get("a", "")} == {"no compiler here"}


def test_a_targets_file_from_several_environments_names_each_rows_file(tmp_path):
    from benchmarks import report
    env = {"device": "cpu", "device_name": "Xeon", "cpu_count": 2, "threads": 2, "dtype": "float32", "torch": "2.13",
           "cuda": None, "transformers": "5", "peft": "0.21", "adaptune": "0.1", "python": "3.11"}
    rec = {"name": "a-dora", "model": "bert-base", "method": "adaptune-dora", "path": "kernels", "median_s": 1.0}
    report.write(tmp_path, "train_step-cpu", {"environment": {**env, "date": "d1"}, "records": [rec]}, "")
    report.write(tmp_path, "ops-cpu", {"environment": {**env, "device_name": "EPYC", "date": "d2"}, "records": []}, "")
    rows = run.check_targets("cpu", out=tmp_path, log=lambda line: None)
    text = (tmp_path / "targets-cpu.md").read_text()
    assert "**2 environments**" in text and "Xeon" in text and "EPYC" in text
    assert {r["source"] for r in rows if r["suite"] == "train_step"} == {"train_step-cpu.json (d1)"}
    assert len(json.loads((tmp_path / "targets-cpu.json").read_text())["environments"]) == 2


def test_scale_out_runs_ddp_and_fsdp2_on_two_processes_and_they_train_alike(tmp_path):
    from benchmarks import scale_out
    scale_out.main(["--tiny", "--steps", "1", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "scale_out-cpu-tiny.json").read_text())
    records = result["records"]
    assert sorted((r["mode"], r["rank"]) for r in records) == [("ddp", 0), ("ddp", 1), ("fsdp2", 0), ("fsdp2", 1)]
    assert all(len(r["losses"]) == 2 and r["held_over_baseline_mb"] > 0 and r["peak_mb"] >= r["baseline_mb"]
               for r in records)
    assert result["losses_agree"] and result["max_loss_diff"] < 1e-3  # the same training under both engines
    assert {r["trainable"] for r in records} == {records[0]["trainable"]} and records[0]["trainable"] > 0
    assert "fsdp2" in (tmp_path / "scale_out-cpu-tiny.md").read_text()
