"""Seed 003's transfer recipes: the few-shot protocol, the self-ensemble (parameter average), self-distillation."""
import math
import random

import pytest
import torch

from adaptune.errors import ConfigError
from adaptune.experiments.common.data import Example
from adaptune.experiments.common.errors import DataError, TrainingError
from adaptune.experiments.fewshot.recipes import ParameterAverage, distillation_loss, few_shot


def examples(counts, interleave=True):
    """counts[c] examples of class c; a is 'c<class>-<j>' (j the rank within its class), line the file line."""
    rows = [(c, j) for c, n in enumerate(counts) for j in range(n)]
    if interleave:
        rows.sort(key=lambda r: (r[1], r[0]))
    return [Example(f"c{c}-{j}", None, float(c), i + 2) for i, (c, j) in enumerate(rows)]


# ---- few_shot ------------------------------------------------------------------------------------------------

def test_few_shot_is_deterministic_per_seed_and_differs_across_seeds():
    data = examples([20, 20, 20])
    assert few_shot(data, 4, 13, 3) == few_shot(data, 4, 13, 3)
    assert few_shot(data, 4, 13, 3) != few_shot(data, 4, 21, 3)
    assert few_shot(data, 4, 13, 3)[0] != few_shot(data, 4, 21, 3)[0]


def test_few_shot_is_balanced_disjoint_subsets_in_file_order():
    data = examples([10, 25, 8])
    train, dev = few_shot(data, 4, 42, 3)
    for part in (train, dev):
        assert [sum(e.label == c for e in part) for c in range(3)] == [4, 4, 4]
        lines = [e.line for e in part]
        assert lines == sorted(lines)
        assert all(e in data for e in part)
    assert not {e.line for e in train} & {e.line for e in dev}


def test_few_shot_follows_the_protocol_one_stream_classes_in_order():
    data, k, seed = examples([9, 12, 7]), 3, 7
    rng, train, dev = random.Random(seed), [], []
    for c in range(3):  # one stream, classes 0, 1, 2; each class's indices in file order, shuffled
        ix = [i for i, e in enumerate(data) if e.label == c]
        rng.shuffle(ix)
        train, dev = train + ix[:k], dev + ix[k:2 * k]
    assert few_shot(data, k, seed, 3) == ([data[i] for i in sorted(train)], [data[i] for i in sorted(dev)])


def test_few_shot_does_not_depend_on_how_classes_interleave():
    mixed, grouped = examples([12, 9], interleave=True), examples([12, 9], interleave=False)
    pick = [[e.a for e in part] for part in few_shot(mixed, 3, 5, 2)]
    assert [sorted(p) for p in pick] == [sorted(e.a for e in part) for part in few_shot(grouped, 3, 5, 2)]


def test_few_shot_refuses_a_class_with_too_few_examples():
    with pytest.raises(DataError, match=r"class 1 has 7 examples; few-shot k=4 needs at least 2k=8"):
        few_shot(examples([10, 7, 9]), 4, 0, 3)
    few_shot(examples([10, 8, 9]), 4, 0, 3)  # exactly 2k is enough


@pytest.mark.parametrize("k", [0, -1, 2.0, True])
def test_few_shot_refuses_a_bad_k(k):
    with pytest.raises(ConfigError, match=r"k \(few-shot examples per class\) must be an integer >= 1"):
        few_shot(examples([10, 10]), k, 0, 2)


def test_few_shot_refuses_labels_that_are_not_class_ids():
    bad = examples([4, 4]) + [Example("x", None, 2.0, 99)]
    with pytest.raises(DataError, match=r"line 99\): label 2.0 is not a class id in 0..1"):
        few_shot(bad, 1, 0, 2)
    with pytest.raises(DataError, match="not a class id"):
        few_shot(examples([4, 4]) + [Example("x", None, math.nan, 99)], 1, 0, 2)


# ---- ParameterAverage -----------------------------------------------------------------------------------------

def params():
    return [torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(4))]


def set_all(ps, value):
    with torch.no_grad():
        for p in ps:
            p.fill_(value)


def test_average_is_the_mean_of_the_last_window_snapshots():
    ps = params()
    avg = ParameterAverage(ps, window=3)
    for v in (1.0, 2.0, 3.0, 4.0):
        set_all(ps, v)
        avg.step()
    assert avg.count == 3
    for p, m in zip(ps, avg.average()):
        assert m.shape == p.shape and m.dtype == p.dtype
        assert torch.equal(m, torch.full_like(p, 3.0))


def test_every_keeps_every_other_step():
    ps = params()
    avg = ParameterAverage(ps, window=2, every=2)
    for v in (1.0, 2.0, 3.0, 4.0, 5.0):  # snapshots at steps 2 and 4: values 2 and 4
        set_all(ps, v)
        avg.step()
    assert avg.count == 2
    assert all(torch.equal(m, torch.full_like(m, 3.0)) for m in avg.average())


def test_average_equals_the_mean_of_saved_checkpoints(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    avg = ParameterAverage(list(model.parameters()), window=3, every=2)
    saved = []
    for step in range(1, 10):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        avg.step()
        if step % 2 == 0:
            saved.append(tmp_path / f"step{step}.pt")
            torch.save([p.detach() for p in model.parameters()], saved[-1])
    loaded = [torch.load(f) for f in saved[-3:]]  # steps 4, 6, 8
    by_hand = [(a + b + c) / 3 for a, b, c in zip(*loaded)]
    for m, h in zip(avg.average(), by_hand):
        torch.testing.assert_close(m, h, rtol=0, atol=1e-7)
    last_four = [(a + b + c + d) / 4 for a, b, c, d in zip(*[torch.load(f) for f in saved])]
    assert not all(torch.allclose(m, h) for m, h in zip(avg.average(), last_four))


def test_swapped_puts_the_average_in_and_restores_the_exact_values():
    ps = params()
    avg = ParameterAverage(ps, window=2)
    for v in (1.0, 2.0):
        set_all(ps, v)
        avg.step()
    with torch.no_grad():
        ps[0].copy_(torch.randn(2, 3))
    before = [p.detach().clone() for p in ps]
    for p in ps:
        p.grad = torch.full_like(p, 7.0)
    with avg.swapped() as mean:
        assert all(torch.equal(p, torch.full_like(p, 1.5)) for p in ps)
        assert all(torch.equal(p, m) for p, m in zip(ps, mean))
    assert all(torch.equal(p, b) for p, b in zip(ps, before))
    with pytest.raises(RuntimeError, match="boom"):
        with avg.swapped():
            raise RuntimeError("boom")
    assert all(torch.equal(p, b) for p, b in zip(ps, before))
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in ps)
    assert all(p.requires_grad and isinstance(p, torch.nn.Parameter) for p in ps)


def test_snapshots_are_copies_not_views():
    ps = params()
    avg = ParameterAverage(ps, window=1)
    set_all(ps, 1.0)
    avg.step()
    set_all(ps, 9.0)
    assert all(torch.equal(m, torch.ones_like(m)) for m in avg.average())


@pytest.mark.parametrize("kwargs, match", [
    ({"window": 0}, "window must be an integer >= 1"),
    ({"window": 2.5}, "window must be an integer >= 1"),
    ({"window": 2, "every": 0}, "`every` .* must be an integer >= 1"),
])
def test_bad_window_or_every(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ParameterAverage(params(), **kwargs)


def test_no_parameters_or_no_snapshot_yet():
    with pytest.raises(ConfigError, match="at least one parameter"):
        ParameterAverage([], window=2)
    avg = ParameterAverage(params(), window=2, every=2)
    avg.step()  # step 1 of every 2: no snapshot
    with pytest.raises(TrainingError, match="no self-ensemble snapshot yet after 1 steps"):
        avg.average()
    with pytest.raises(TrainingError, match="no self-ensemble snapshot"):
        with avg.swapped():
            pass


def test_a_non_finite_snapshot_is_refused():
    ps = params()
    avg = ParameterAverage(ps, window=2)
    with torch.no_grad():
        ps[1][0] = math.inf
    with pytest.raises(TrainingError, match=r"step 1: parameters \[1\] are not finite"):
        avg.step()
    assert avg.count == 0


# ---- distillation_loss ----------------------------------------------------------------------------------------

LOGITS = [[2.0, 0.5], [0.1, 1.0]]
TEACHER = [[1.0, 1.0], [0.0, 2.0]]


def test_distillation_loss_equals_a_hand_computation():
    logits = torch.tensor(LOGITS, requires_grad=True)
    labels, teacher = torch.tensor([0, 1]), torch.tensor(TEACHER)
    loss, parts = distillation_loss(logits, labels, teacher, 0.5)
    z = torch.tensor(LOGITS)
    log_p = z - torch.log(torch.exp(z).sum(dim=1, keepdim=True))
    ce = -(log_p[0, 0] + log_p[1, 1]) / 2
    mse = ((z - teacher) ** 2).sum() / 4
    # by hand: CE = ((log(1 + e^-1.5)) + (log(1 + e^-0.9))) / 2 = (0.201413 + 0.341154) / 2 = 0.271283;
    # MSE = (1 + 0.25 + 0.01 + 1) / 4 = 0.565; loss = 0.271283 + 0.5 * 0.565 = 0.553783
    assert abs(ce.item() - 0.271283) < 1e-5 and abs(mse.item() - 0.565) < 1e-6
    assert abs(loss.item() - 0.553783) < 1e-5
    torch.testing.assert_close(loss.detach(), ce + 0.5 * mse)
    assert parts == pytest.approx({"ce": ce.item(), "mse": mse.item()})


def test_float_labels_and_weight_zero_give_plain_cross_entropy():
    logits = torch.tensor(LOGITS)
    loss, parts = distillation_loss(logits, torch.tensor([0.0, 1.0]), torch.tensor(TEACHER), 0)
    assert torch.equal(loss, torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])))
    assert parts["mse"] == pytest.approx(0.565)


def test_the_teacher_gets_no_gradient():
    logits = torch.tensor(LOGITS, requires_grad=True)
    teacher = torch.tensor(TEACHER, requires_grad=True)
    loss, _ = distillation_loss(logits, torch.tensor([0, 1]), teacher, 1.0)
    loss.backward()
    assert teacher.grad is None
    assert logits.grad is not None and bool(logits.grad.abs().sum() > 0)


@pytest.mark.parametrize("weight", [-0.1, math.nan, math.inf, "0.5", None])
def test_bad_weight(weight):
    with pytest.raises(ConfigError, match="distillation weight must be a finite number >= 0"):
        distillation_loss(torch.tensor(LOGITS), torch.tensor([0, 1]), torch.tensor(TEACHER), weight)


def test_shape_mismatch_names_the_shapes():
    with pytest.raises(ConfigError, match=r"logits \(2, 2\), teacher_logits \(2, 3\)"):
        distillation_loss(torch.tensor(LOGITS), torch.tensor([0, 1]), torch.zeros(2, 3), 0.5)
    with pytest.raises(ConfigError, match=r"labels must be \(batch,\) = \(2,\).* got labels \(3,\)"):
        distillation_loss(torch.tensor(LOGITS), torch.tensor([0, 1, 1]), torch.tensor(TEACHER), 0.5)


@pytest.mark.parametrize("labels", [[0, 2], [0.5, 1.0], [math.nan, 0.0], [-1, 0]])
def test_labels_that_are_not_class_ids(labels):
    with pytest.raises(DataError, match=r"class ids in 0..1"):
        distillation_loss(torch.tensor(LOGITS), torch.tensor(labels), torch.tensor(TEACHER), 0.5)
