"""The CLI through typer's CliRunner."""
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
