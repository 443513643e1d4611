"""Bindings: what `Adaptation.bindings()` exposes, and merge state held by the hooks."""
import pytest
import torch

from adaptune import Adapter, LoRA, Prefix, TaskError, attach
from adaptune.points import ATTENTION, PROJECTION, SUBLAYER, Point
from helpers import out, randomize


@pytest.fixture
def adaptation(model):
    return attach(model, {"attn": LoRA(4) | Prefix(2)}, tasks={"a": {"ffn": Adapter(8)}, "b": {"ffn": Adapter(4)}})


def test_bindings_cover_every_bound_module_once(adaptation):
    found = list(adaptation.bindings())
    bound = [m for group in (adaptation.shared, *adaptation.tasks.values()) for ms in group.points.values()
             for m in ms]
    assert sorted(map(id, (b.module for b in found))) == sorted(map(id, bound))
    n = adaptation.sites.n_layers
    assert [b.point.kind for b in found].count(PROJECTION) == 3 * n  # q, k, v per layer
    assert [b.point.kind for b in found].count(ATTENTION) == n


def test_bindings_filter_by_group_and_kind(adaptation):
    n = adaptation.sites.n_layers
    shared = list(adaptation.bindings([None]))
    assert {b.group for b in shared} == {None} and len(shared) == 4 * n
    task_a = list(adaptation.bindings(["a"], kind=SUBLAYER))
    assert {b.group for b in task_a} == {"a"} and len(task_a) == n
    assert all(b.module.down_weight.shape[0] == 8 and b.point.site == "ffn" for b in task_a)
    assert list(adaptation.bindings([None], kind=SUBLAYER)) == []


def test_bindings_of_an_unknown_task_raise_at_once(adaptation):
    with pytest.raises(TaskError, match="unknown task 'c'; tasks: 'a', 'b'"):
        adaptation.bindings(["c"])  # not only when iterated


def test_merge_state_lives_in_the_hooks_and_unmerge_clears_it(model, ids):
    adaptation = attach(model, {"attn": LoRA(4)})
    randomize(adaptation)
    before = out(model, ids)
    weights = {n: p.clone() for n, p in model.named_parameters() if "adaptune" not in n}
    adaptation.merge()
    assert adaptation.merged and all(h.merged for h in adaptation.hooks.values())
    assert all(not h.active() for h in adaptation.hooks.values())  # merged bindings no longer run
    torch.testing.assert_close(out(model, ids), before, rtol=1e-4, atol=1e-5)
    adaptation.unmerge()
    assert not adaptation.merged and not any(h.merged for h in adaptation.hooks.values())
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters() if "adaptune" not in n)


def test_a_point_of_an_unknown_kind_is_refused(model):
    with pytest.raises(ValueError, match="point kind 'weights'"):
        Point("weights", "k", "attn", 0, model, 1, 1)
