"""Multitask SFT in one step under DDP and FSDP2: AdapterTrainer(task_column=...) on 2 CPU processes (gloo), and
TRL's SFTTrainer with the mixin under FSDP2, one torchrun launch of tests/multitask_worker.py per engine; refused
under DeepSpeed.

The worker trains in order, so the tasks of each rank's batch are known (step 0: rank 0 has task a only, rank 1
task b only; step 2: no rank has b; task c is never named). Under FSDP2 the components of a task a rank's batch
lacks get a zero gradient there (trainer_routing.AbsentTasks); without it the ranks' reductions stop matching.
The tests replay the recorded batches in one process (AdamW on the mean of the two ranks' losses, each batch
routed) and compare.
"""
from pathlib import Path

import pytest
import torch
from helpers import VOCAB, tiny_llama, two_ranks
from multitask_worker import ORDER, STEPS, TASKS, adapted
from test_trainer_sharded import ATOL
from transformers import TrainingArguments

from adaptune import Adapter, ConfigError, LoRA, attach
from adaptune.trainer import AdapterTrainer

WORKER = Path(__file__).with_name("multitask_worker.py")


@pytest.fixture(scope="module", params=("ddp", "fsdp2", "fsdp2-sft"))
def run(request, tmp_path_factory):
    engine = request.param
    if engine.endswith("sft"):
        pytest.importorskip("trl")
    return engine, *two_ranks(WORKER, engine, tmp_path_factory.mktemp(engine))


def one_process(r0: dict, r1: dict, skip_absent: bool = True) -> dict[str, torch.Tensor]:
    """The components after one process replays both ranks' batches: each step AdamW (the trainer's settings)
    on the mean of the two ranks' losses, each batch routed to its samples' tasks. skip_absent=False: every task
    without a sample in the step gets a zero gradient instead (AdamW then still moves it by its moments)."""
    model = adapted()
    adaptation = model.adaptune
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0, fused=True)
    for b0, b1 in zip(r0["batches"], r1["batches"]):
        loss = 0
        for b in (b0, b1):
            with adaptation.route(b["task"]):
                loss = loss + model(input_ids=b["input_ids"], labels=b["labels"]).loss / 2
        loss.backward()
        if not skip_absent:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {k: v.detach().clone() for k, v in adaptation.state_dict().items()}


@pytest.fixture(scope="module")
def reference(run):
    return one_process(run[1], run[2])


def test_the_engine_ran_on_the_planned_batches(run):
    engine, r0, r1 = run
    assert r0["engine_seen"] == {"fsdp": engine.startswith("fsdp2"), "deepspeed": False}
    assert r0["checkpointing"] == engine.endswith("sft")  # SFTConfig's default: the forward recomputed, routed
    names = list(TASKS)
    for rank, r in ((0, r0), (1, r1)):
        assert len(r["batches"]) == STEPS
        for step, b in enumerate(r["batches"]):
            first = 4 * step + 2 * rank
            assert [names[i] for i in b["task"].tolist()] == ORDER[first:first + 2]
    assert names[1] not in [ORDER[i] for i in range(8, 12)]  # step 2 has no sample of task b on any rank


def test_ranks_hold_the_same_components(run):
    _, r0, r1 = run
    assert r0["whole"].keys() == r1["whole"].keys()
    for k in r0["whole"]:
        assert torch.equal(r0["whole"][k], r1["whole"][k]), k


def test_training_equals_one_process_on_both_ranks_batches(run, reference):
    engine, r0, r1 = run
    start, got = r0["start"], r0["whole"]
    assert got.keys() == reference.keys()
    for k in got:
        assert torch.allclose(got[k], reference[k], rtol=0, atol=ATOL), (k, (got[k] - reference[k]).abs().max())
        if not k.startswith("tasks.c."):
            assert (got[k] - start[k]).abs().max() > 100 * ATOL, k  # it trained (a lost update would show)


def test_a_task_no_rank_has_at_a_step_is_left_alone(run, reference):
    """Task b's gradient is None at step 2, as in one process, and AdamW leaves it alone there; a zero gradient
    would have moved it by AdamW's moments, far more than the tolerance."""
    _, r0, r1 = run
    zero_steps = one_process(r0, r1, skip_absent=False)
    keys = [k for k in r0["whole"] if k.startswith("tasks.b.")]
    assert keys
    for k in keys:
        assert (zero_steps[k] - reference[k]).abs().max() > 100 * ATOL, k
        assert torch.allclose(r0["whole"][k], reference[k], rtol=0, atol=ATOL), k


def test_a_task_no_sample_names_never_moves(run):
    _, r0, _ = run
    keys = [k for k in r0["whole"] if k.startswith("tasks.c.")]
    assert keys
    for k in keys:
        assert torch.equal(r0["whole"][k], r0["start"][k]), k


@pytest.mark.parametrize("how", ["deepspeed", "accelerate-launch-deepspeed"])
def test_task_column_is_refused_under_deepspeed(tmp_path, monkeypatch, how):
    """ZeRO reduces gradients in the order the backward produces them, which differs between ranks whose batches
    hold other tasks (measured with this worker under DeepSpeed before the refusal: ZeRO-2 ended with components
    far from the one-process run's without an error, ZeRO-3 aborted in gloo)."""
    model = tiny_llama(seed=0)
    attach(model, tasks={"a": {"attn": LoRA(2)}, "b": {"ffn": Adapter(4)}})
    ids = torch.randint(2, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row, "task": task} for row, task in zip(ids, "ab")]
    training = TrainingArguments(str(tmp_path / "out"), use_cpu=True, report_to=[])
    if how == "deepspeed":
        training.deepspeed = {"zero_optimization": {"stage": 2}}  # as TrainingArguments(deepspeed=...) holds it
    else:
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match="task_column='task' is supported with one process, DDP and FSDP2, not "
                                          "under DeepSpeed .*other orders"):
        AdapterTrainer(model, training, train_dataset=data, task_column="task")
    assert not (tmp_path / "out").exists()
