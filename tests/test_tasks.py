"""Tasks: a shared LoRA plus per-task adapters; switching, contexts, disabling, errors, gradients."""
import pytest
import torch

from adaptune import Adapter, LoRA, TaskError, attach
from helpers import out, randomize


@pytest.fixture
def setup(model, ids):
    """(model, adaptation, outputs by state) with every component randomised."""
    base = out(model, ids)
    adaptation = attach(model, {"attn": LoRA(4)},
                        tasks={"a": {"ffn": Adapter(8)}, "b": {"ffn": Adapter(8)}})
    randomize(adaptation)
    outputs = {"base": base}
    for task in ("a", "b", None):
        adaptation.use(task)
        outputs[task] = out(model, ids)
    adaptation.use("a")
    return model, adaptation, outputs


def test_first_task_is_active_by_default(model):
    adaptation = attach(model, {"attn": LoRA(2)}, tasks={"x": {"ffn": Adapter(4)}, "y": {"ffn": Adapter(4)}})
    assert adaptation.task == "x" and adaptation.task_names == ["x", "y"]


def test_active_argument_picks_the_starting_task(model):
    adaptation = attach(model, tasks={"x": {"ffn": Adapter(4)}, "y": {"ffn": Adapter(4)}}, active="y")
    assert adaptation.task == "y"


def test_each_task_gives_its_own_output(setup, ids):
    model, adaptation, outputs = setup
    assert not torch.allclose(outputs["a"], outputs["b"])
    assert not torch.allclose(outputs[None], outputs["a"]) and not torch.allclose(outputs[None], outputs["base"])
    adaptation.use("b")
    assert adaptation.task == "b" and torch.equal(out(model, ids), outputs["b"])
    adaptation.use("a")
    assert torch.equal(out(model, ids), outputs["a"])


def test_use_none_runs_the_shared_components_only(setup, ids):
    model, adaptation, outputs = setup
    adaptation.use(None)
    assert adaptation.task is None
    for group in adaptation.tasks.values():  # same output as with the task adapters zeroed
        for p in group.parameters():
            p.data.zero_()
    adaptation.use("a")
    assert torch.equal(out(model, ids), outputs[None])


def test_using_restores_the_previous_task(setup, ids):
    model, adaptation, outputs = setup
    with adaptation.using("b") as same:
        assert same is adaptation and adaptation.task == "b"
        assert torch.equal(out(model, ids), outputs["b"])
    assert adaptation.task == "a"
    with pytest.raises(RuntimeError, match="boom"):
        with adaptation.using(None):
            raise RuntimeError("boom")
    assert adaptation.task == "a" and torch.equal(out(model, ids), outputs["a"])


def test_disabled_gives_the_base_model_output_exactly(setup, ids):
    model, adaptation, outputs = setup
    with adaptation.disabled():
        assert not adaptation.enabled
        assert torch.equal(out(model, ids), outputs["base"])
    assert adaptation.enabled and torch.equal(out(model, ids), outputs["a"])
    adaptation.disable()
    assert torch.equal(out(model, ids), outputs["base"])
    adaptation.enable()
    assert torch.equal(out(model, ids), outputs["a"])


def test_disabled_restores_state_on_exception(setup):
    _, adaptation, _ = setup
    with pytest.raises(ValueError):
        with adaptation.disabled():
            raise ValueError
    assert adaptation.enabled


def test_unknown_task_raises_naming_the_valid_tasks(setup):
    _, adaptation, _ = setup
    for call in (lambda: adaptation.use("c"), lambda: adaptation.using("c").__enter__()):
        with pytest.raises(TaskError, match="unknown task 'c'") as err:
            call()
        assert "'a'" in str(err.value) and "'b'" in str(err.value)
    assert adaptation.task == "a"


def test_unknown_active_task_at_attach_raises_and_leaves_the_model_alone(model):
    with pytest.raises(TaskError, match="'x'"):
        attach(model, tasks={"x": {"ffn": Adapter(4)}}, active="nope")
    assert not hasattr(model, "adaptune") and all(p.requires_grad for p in model.parameters())


def test_gradients_of_the_inactive_task_stay_none(setup, ids):
    model, adaptation, _ = setup
    adaptation.use("b")
    o = model(ids)
    (o.logits if hasattr(o, "logits") else o.last_hidden_state).pow(2).mean().backward()
    assert all(p.grad is None for p in adaptation.tasks["a"].parameters())
    for n, p in [*adaptation.tasks["b"].named_parameters(), *adaptation.shared.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n


def test_all_tasks_are_in_the_state_dict_and_trainable(setup):
    model, adaptation, _ = setup
    keys = [k for k in model.state_dict() if k.startswith("adaptune.")]
    assert any(k.startswith("adaptune.tasks.a.") for k in keys) and any(k.startswith("adaptune.tasks.b.") for k in keys)
    assert any(k.startswith("adaptune.shared.") for k in keys)
    assert all(p.requires_grad for p in adaptation.parameters())


def test_spec_reports_the_composition_as_data(setup):
    _, adaptation, _ = setup
    spec = adaptation.spec()
    assert spec["shared"] == {"attn": [LoRA(4).to_dict()]}
    assert spec["tasks"] == {"a": {"ffn": [Adapter(8).to_dict()]}, "b": {"ffn": [Adapter(8).to_dict()]}}


def test_use_on_an_adaptation_without_tasks_says_there_are_none(model):
    adaptation = attach(model, {"attn": LoRA(2)})
    assert adaptation.task is None
    with pytest.raises(TaskError, match="no tasks"):
        adaptation.use("a")
    adaptation.use(None)


def test_repr_shows_the_composition_and_state(setup):
    _, adaptation, _ = setup
    text = repr(adaptation)
    assert "attn: LoRA(r=4" in text and "[a] ffn: Adapter(dim=8" in text and "[b] ffn: Adapter(dim=8" in text
    assert "active task: 'a', enabled: True, merged: False" in text
