"""The CLI through typer's CliRunner."""
import subprocess
import sys

from typer.testing import CliRunner

from adaptune.cli.app import app

runner = CliRunner()


def test_inspect_lists_sites_and_counts_the_spec():
    result = runner.invoke(app, ["inspect", "bert-tiny", "--spec", "attn=LoRA(8); ffn=Adapter(16)"])
    assert result.exit_code == 0, result.output
    for site in ("embed", "attn.q", "attn.o", "ffn.down"):
        assert site in result.output
    # bert-tiny: 4 layers, d = 128; LoRA on q,k,v: 4·3·8·256; adapters 4·(2·16·128 + 128 + 16)
    expected = 4 * 3 * 8 * 256 + 4 * (2 * 16 * 128 + 128 + 16)
    assert f"{expected:,} trainable parameters" in result.output


def test_inspect_bad_site_exits_2_with_the_valid_sites():
    result = runner.invoke(app, ["inspect", "gpt2-tiny", "--spec", "atn=LoRA(8)"])
    assert result.exit_code == 2
    assert "unknown site 'atn'" in result.output and "attn.q" in result.output


def test_info_reports_versions_and_op_paths():
    result = runner.invoke(app, ["info"])
    assert result.exit_code == 0, result.output
    assert "torch" in result.output and "lora" in result.output and "reference" in result.output


def test_info_with_an_invalid_kernel_mode_exits_2_naming_the_valid_modes(monkeypatch):
    from adaptune import ops
    monkeypatch.setattr(ops, "_mode", "fast")  # as ADAPTUNE_KERNELS=fast sets it at import
    result = runner.invoke(app, ["info"])
    assert result.exit_code == 2 and "'fast' is not valid" in result.output and "auto, off, require" in result.output


# `run multitask`: options generated from the config dataclasses
# the option names of `run multitask` before they were generated: users' scripts use them (--stack is now --spec,
# the flag `adaptune inspect` has for the same text)
LEGACY_OPTIONS = {
    "--method", "--r", "--dim", "--n", "--spec", "--per-task", "--shared", "--model", "--tokenizer", "--tasks",
    "--data-dir", "--quick", "--epochs", "--train-limit", "--dev-limit", "--max-length", "--batch-size", "--lr",
    "--head-lr", "--layer-lr-decay", "--split-ratio", "--augment", "--n-aug", "--synonyms", "--seed", "--data-seed",
    "--device", "--threads", "--name", "--out", "--overwrite"}
ADDED_OPTIONS = {"--batching", "--quantize", "--fsdp"}  # options added since; never removed


def multitask_command():
    import typer
    return typer.main.get_command(app).commands["run"].commands["multitask"]


def test_every_config_field_is_an_option_with_the_fields_default_and_help():
    import dataclasses

    from adaptune.experiments.common.methods import Method
    from adaptune.experiments.multitask.config import ExperimentConfig
    params = {p.name: p for p in multitask_command().params}
    names = {"name": "method"}  # Method.name is --method (ExperimentConfig.name is the run's --name)
    for cls, skip in ((Method, set()), (ExperimentConfig, {"method", "command"})):
        fields = dataclasses.fields(cls)
        assert {f.name for f in fields if "help" not in f.metadata} == skip  # a new field needs help to be an option
        for f in fields:
            if f.name in skip:
                continue
            p = params[names.get(f.name, f.name) if cls is Method else f.name]
            assert p.default == (",".join(f.default) if isinstance(f.default, tuple) else f.default), f.name
            assert p.help == f.metadata["help"], f.name
    assert {o for p in params.values() for o in (*p.opts, *p.secondary_opts)} == LEGACY_OPTIONS | ADDED_OPTIONS


def capture_config(monkeypatch, args):
    """The ExperimentConfig that `run multitask ARGS` hands to the experiment (which is not run)."""
    import adaptune.experiments.multitask.run as multitask
    from adaptune.errors import ConfigError
    seen = []

    def fake_run(cfg, progress=None):
        seen.append(cfg)
        raise ConfigError("not run in this test")

    monkeypatch.setattr(multitask, "run", fake_run)
    result = runner.invoke(app, ["run", "multitask", *args])
    assert result.exit_code == 2 and "not run in this test" in result.output, result.output
    return seen[0]


def test_options_given_reach_the_config(monkeypatch):
    cfg = capture_config(monkeypatch, [
        "--method", "dora", "--r", "4", "--shared", "--model", "bert-tiny", "--tasks", "sst,sts", "--data-dir", "d",
        "--quick", "--epochs", "2", "--train-limit", "8", "--lr", "0.01", "--head-lr", "0.5", "--layer-lr-decay",
        "0.9", "--split-ratio", "0.5", "--augment", "eda", "--n-aug", "3", "--seed", "7", "--data-seed", "5",
        "--name", "x", "--out", "o"])
    assert (cfg.method.name, cfg.method.r, cfg.method.per_task) == ("dora", 4, False)
    assert (cfg.model, cfg.tasks, cfg.data_dir, cfg.quick, cfg.epochs, cfg.train_limit) == (
        "bert-tiny", ("sst", "sts"), "d", True, 2, 8)
    assert (cfg.lr, cfg.head_lr, cfg.layer_lr_decay, cfg.split_ratio) == (0.01, 0.5, 0.9, 0.5)
    assert (cfg.augment, cfg.n_aug, cfg.seed, cfg.data_seed, cfg.name, cfg.out) == ("eda", 3, 7, 5, "x", "o")
    for part in ("--method dora", "--r 4", "--shared", "--tasks sst,sts", "--quick", "--lr 0.01", "--out o"):
        assert part in cfg.command, cfg.command  # the command line recorded in command.txt
    assert "--dim" not in cfg.command  # defaults are left out


def test_no_options_give_the_config_defaults_and_spec_alone_selects_method_spec(monkeypatch):
    import dataclasses

    from adaptune.experiments.common.methods import Method
    from adaptune.experiments.multitask.config import ExperimentConfig
    cfg = capture_config(monkeypatch, [])
    assert dataclasses.replace(cfg, command="") == ExperimentConfig()
    assert cfg.command == "adaptune run multitask"
    cfg = capture_config(monkeypatch, ["--spec", "attn=LoRA(2)", "--per-task"])
    assert cfg.method == Method("spec", spec="attn=LoRA(2)", per_task=True)
    assert "--per-task" in cfg.command and "--method" not in cfg.command


def test_importing_the_cli_imports_no_torch():
    """The CLI starts without torch or transformers (`adaptune --help` stays quick): its modules, adaptune's
    exports and the config modules the options are generated from import them only when a command runs."""
    code = ("import sys; import adaptune.cli.app; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout
