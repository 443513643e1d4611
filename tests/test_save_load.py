"""save -> load round trips exactly; bad files and other models give LoadError; writes are atomic."""
import pytest
import torch
from helpers import randomize, tiny_bert, tiny_gpt2
from safetensors.torch import save_file

from adaptune import Adapter, DoRA, LoadError, LoRA, attach, load, save

SPEC = {"attn": LoRA(4, alpha=8), "attn.o": DoRA(2), "ffn": Adapter(8, placement="parallel")}
TASKS = {"a": {"layers.0.ffn": Adapter(4)}, "b": {"layers.1.ffn": Adapter(6, act="gelu")}}


def _outputs(model, ids):
    return model(ids)[0]


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_bert])
def test_round_trip_is_exact_for_every_task(tmp_path, make, ids):
    model = make()
    adaptation = attach(model, SPEC, tasks=TASKS, active="b")
    randomize(adaptation)
    expected = {}
    for task in ("a", "b"):
        with adaptation.using(task):
            expected[task] = _outputs(model, ids)
    path = save(model, tmp_path / "adapters.safetensors")

    fresh = make()
    loaded = load(fresh, path)
    assert loaded.task == "b"  # the active task is saved
    assert loaded.spec() == adaptation.spec()
    for key, value in adaptation.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    for task in ("a", "b"):
        with loaded.using(task):
            assert torch.equal(_outputs(fresh, ids), expected[task])


def test_load_into_other_architecture_raises_and_leaves_model_unchanged(tmp_path, ids):
    adaptation = attach(tiny_gpt2(), {"attn": LoRA(4)})
    path = adaptation.save(tmp_path / "gpt2.safetensors")
    bert = tiny_bert()
    before = {k: v.clone() for k, v in bert.state_dict().items()}
    with pytest.raises(LoadError, match="gpt2.*bert"):
        load(bert, path)
    assert not hasattr(bert, "adaptune")
    assert all(torch.equal(before[k], v) for k, v in bert.state_dict().items())


def test_load_into_model_of_other_width_names_the_tensor(tmp_path):
    attach(tiny_bert(hidden=32), {"attn": LoRA(4)}).save(tmp_path / "a.safetensors")
    wide = tiny_bert(hidden=64)
    with pytest.raises(LoadError, match=r"other shape.*saved \(4, 32\), model needs \(4, 64\)"):
        load(wide, tmp_path / "a.safetensors")
    assert not hasattr(wide, "adaptune")
    assert all(p.requires_grad for p in wide.parameters())


def test_load_into_model_with_fewer_layers_fails_cleanly(tmp_path):
    attach(tiny_bert(layers=3), {"layers.2.ffn": Adapter(4)}).save(tmp_path / "a.safetensors")
    small = tiny_bert(layers=2)
    with pytest.raises(LoadError, match="out of range"):
        load(small, tmp_path / "a.safetensors")
    assert not hasattr(small, "adaptune")


def test_missing_and_foreign_files_raise_load_error(tmp_path):
    with pytest.raises(LoadError, match="no saved adaptation"):
        load(tiny_bert(), tmp_path / "nothing.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(LoadError, match="no adaptune metadata"):
        load(tiny_bert(), tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LoadError, match="not a readable"):
        load(tiny_bert(), tmp_path / "junk.safetensors")


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    model = tiny_bert()
    adaptation = attach(model, {"attn": LoRA(4)})
    path = adaptation.save(tmp_path / "keep.safetensors")
    original = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("adaptune.save_format.save_file", broken)
    randomize(adaptation)
    with pytest.raises(OSError, match="disk full"):
        adaptation.save(path)
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["keep.safetensors"]  # no temporary left behind
