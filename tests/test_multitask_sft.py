"""Multitask SFT in one step: AdapterTrainer(task_column=...) and the mixin on TRL's SFTTrainer route each sample
to its task's components. Checked on a tiny Llama with a LoRA task, an Adapter task and a Prefix task: a mixed
step's loss and update are those of the mean of each sample's loss run alone under use(task); a batch of one
task leaves the other tasks' components bit-unchanged; evaluation and prediction route too; names and indices
train the same; gradient checkpointing (SFTConfig's default) routes the recomputed forward; a resumed run ends
bit-exact; and the refusals."""
import pytest
import torch
from datasets import Dataset
from helpers import VOCAB, StopAt, perturb, tiny_llama, weights
from transformers import TrainingArguments

from adaptune import Adapter, ConfigError, LoRA, Prefix, TaskError, attach
from adaptune.trainer import AdapterCheckpoints, AdapterTrainer
from adaptune.trainer_routing import TaskColumn

TASKS = {"a": {"attn": LoRA(4)}, "b": {"ffn": Adapter(8)}, "c": {"attn": Prefix(2)}}
MIXED = ["a", "b", "c", None, "b", "a"]  # None: the shared components only (there are none: the base)
LR = 0.5
WORDS = "the a cat dog sat ran on under mat log red blue big small and is was happy sad good bad".split()


def adapted(seed: int = 1, moved: bool = True):
    """The same tiny Llama (no dropout) every time, with the three tasks' components drawn with `seed`; `moved`:
    every component off its start, so that each of its parameters gets a gradient at the first step."""
    model = tiny_llama().train()
    torch.manual_seed(seed)
    attach(model, tasks=TASKS)
    if moved:
        perturb(model.adaptune, std=0.05, seed=seed)
    return model


def rows(tasks, length: int = 10, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (len(tasks), length), generator=g)
    return [{"input_ids": row.tolist(), "labels": row.tolist(), "task": t} for row, t in zip(ids, tasks)]


def dataset(tasks, **kw) -> Dataset:
    return Dataset.from_list(rows(tasks, **kw))


def arguments(out, **kw) -> TrainingArguments:
    base = dict(max_steps=1, per_device_train_batch_size=len(MIXED), per_device_eval_batch_size=len(MIXED),
                learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=0.0, seed=0, use_cpu=True,
                report_to=[], disable_tqdm=True, dataloader_num_workers=0, logging_strategy="no", save_strategy="no")
    return TrainingArguments(str(out), **{**base, **kw})


class Recording(AdapterTrainer):
    """AdapterTrainer keeping each step's loss."""

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        self.losses = [*getattr(self, "losses", []), loss.item()]
        return loss


def sgd_trainer(model, out, data, cls=Recording, **kw):
    optimizer = torch.optim.SGD(model.adaptune.parameters(), lr=LR)  # no momentum, no weight decay
    return cls(model, arguments(out, **kw), train_dataset=data, optimizers=(optimizer, None), task_column="task")


def group(model, task) -> dict:
    """The state of `task`'s components, cloned."""
    return {k: v.detach().clone() for k, v in model.adaptune.tasks[task].state_dict().items()}


def each_alone(model, samples) -> torch.Tensor:
    """The mean of each sample's loss, run alone under use(its task)."""
    losses = []
    for s in samples:
        ids = torch.tensor([s["input_ids"]])
        with model.adaptune.using(s["task"]):
            losses.append(model(ids, labels=ids).loss)
    return torch.stack(losses).mean()


def test_a_mixed_step_is_the_mean_of_each_sample_alone_under_its_task(tmp_path):
    """One SGD step on a batch mixing three tasks and a shared-only sample: the Trainer's loss is the mean of the
    samples' losses each run alone under use(task), and every component moved by exactly -lr times that mean's
    gradient: each sample's gradient reached its task's components and no other's."""
    samples = rows(MIXED)
    model, manual = adapted(), adapted()
    trainer = sgd_trainer(model, tmp_path, Dataset.from_list(samples))
    trainer.train()
    loss = each_alone(manual, samples)
    loss.backward()
    assert trainer.losses == [pytest.approx(loss.item(), rel=1e-5)]
    want = {k: (p - LR * p.grad).detach() for k, p in manual.adaptune.named_parameters()}
    got, start = dict(model.adaptune.named_parameters()), adapted().adaptune.state_dict()
    assert want.keys() == got.keys() and all(p.grad is not None for p in manual.adaptune.parameters())
    for k, p in want.items():
        torch.testing.assert_close(got[k].detach(), p, atol=1e-6, rtol=1e-5, msg=k)
        assert not torch.equal(got[k].detach(), start[k]), k  # every component moved


@pytest.mark.parametrize("task", ["a", "b", "c"])
def test_a_batch_of_one_task_leaves_the_other_tasks_unchanged(tmp_path, task):
    model = adapted()
    before = {t: group(model, t) for t in TASKS}
    sgd_trainer(model, tmp_path, dataset([task] * len(MIXED)), max_steps=2).train()
    for t in TASKS:
        after = group(model, t)
        if t == task:
            assert all(not torch.equal(after[k], v) for k, v in before[t].items()), t
        else:
            assert all(torch.equal(after[k], v) for k, v in before[t].items()), t


def test_names_and_indices_train_the_same_from_a_dataset_or_a_list(tmp_path):
    """The column may hold task names or their indices (-1: shared only); a list of dicts (the collator path that
    Trainer filters by columns) trains as a datasets.Dataset does."""
    index = [-1 if t is None else list(TASKS).index(t) for t in MIXED]
    runs = []
    for i, data in enumerate([dataset(MIXED * 2), Dataset.from_list(rows(index * 2)), rows(MIXED * 2)]):
        model = adapted()
        AdapterTrainer(model, arguments(tmp_path / str(i), max_steps=2), train_dataset=data,
                       task_column="task").train()
        runs.append(weights(model))
    assert all(torch.equal(runs[0][k], run[k]) for run in runs[1:] for k in runs[0])


def test_evaluation_and_prediction_route_each_sample(tmp_path):
    samples = rows(MIXED, seed=5)
    model = adapted()
    trainer = AdapterTrainer(model, arguments(tmp_path), eval_dataset=Dataset.from_list(samples), task_column="task")
    assert trainer.evaluate()["eval_loss"] == pytest.approx(each_alone(model, samples).item(), rel=1e-5)
    predicted = trainer.predict(Dataset.from_list(samples))
    model.eval()
    with torch.no_grad():
        for row, s in zip(predicted.predictions, samples):
            with model.adaptune.using(s["task"]):
                want = model(torch.tensor([s["input_ids"]])).logits[0]
            torch.testing.assert_close(torch.as_tensor(row), want, atol=1e-5, rtol=1e-5)
    assert predicted.metrics["test_loss"] == pytest.approx(each_alone(model, samples).item(), rel=1e-5)


STEPS, SAVE_EVERY = 4, 2


def resume_run(make, root):
    """An uninterrupted run, and one interrupted at SAVE_EVERY then resumed by a new trainer on a new model."""
    whole, first, resumed = adapted(moved=False), adapted(moved=False), adapted(seed=2, moved=False)
    start = weights(whole)
    make(whole, root / "whole").train()
    make(first, root / "cut", callbacks=[StopAt(SAVE_EVERY)]).train()
    trainer = make(resumed, root / "cut")
    trainer.train(resume_from_checkpoint=str(root / "cut" / f"checkpoint-{SAVE_EVERY}"))
    return start, whole, resumed, trainer


def check_resumed(start, whole, resumed, trainer):
    w1, w2 = weights(whole), weights(resumed)
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert trainer.state.global_step == STEPS
    for task in TASKS:  # every task's components trained
        prefix = f"tasks.{task}."
        assert any(not torch.equal(start[k], w1[k]) for k in w1 if k.startswith(prefix)), task


def test_adapter_trainer_resumes_bit_exact_with_a_task_column(tmp_path):
    data = dataset(MIXED * 4)

    def make(model, out, **kw):
        args = arguments(out, max_steps=STEPS, save_strategy="steps", save_steps=SAVE_EVERY, learning_rate=1e-2,
                         lr_scheduler_type="linear", warmup_steps=1, per_device_train_batch_size=4)
        return AdapterTrainer(model, args, train_dataset=data, task_column="task", **kw)

    check_resumed(*resume_run(make, tmp_path))


# ---- TRL's SFTTrainer ------------------------------------------------------------------------------------------


def sft_class():
    pytest.importorskip("trl")  # trl needs Python >= 3.11 (setup.py's test extra installs it there)
    from trl import SFTTrainer

    class SFT(AdapterCheckpoints, SFTTrainer):
        pass
    return SFT


def tokenizer():
    """A word-level tokenizer built in memory (ids below helpers.VOCAB); </s> ends and pads."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>",
                                   unk_token="<unk>")


TEXTS = ["the cat sat on the mat", "a dog ran under the log", "the red cat is happy", "a big dog was sad",
         "the small cat ran on the mat", "a blue dog sat under the log", "the cat and the dog sat", "a good dog is big"]


def texts(tasks) -> Dataset:
    return Dataset.from_dict({"text": TEXTS[:len(tasks)], "task": list(tasks)})


def sft(model, out, data, sgd: bool = False, callbacks=None, eval_dataset=None, **kw):
    """SFTConfig's defaults (bf16 autocast, gradient checkpointing) unless `kw` says otherwise; `sgd`: plain SGD."""
    from trl import SFTConfig
    config = dict(max_steps=STEPS, save_steps=SAVE_EVERY, learning_rate=1e-2, warmup_steps=1, seed=0, use_cpu=True,
                  report_to=[], disable_tqdm=True, logging_strategy="no", dataloader_num_workers=0, max_length=16,
                  per_device_train_batch_size=4)
    args = SFTConfig(str(out), **{**config, **kw})
    optimizers = (torch.optim.SGD(model.adaptune.parameters(), lr=LR), None) if sgd else (None, None)
    return sft_class()(model, args, train_dataset=data, eval_dataset=eval_dataset, processing_class=tokenizer(),
                       task_column="task", optimizers=optimizers, callbacks=callbacks)


def test_sft_trainer_resumes_bit_exact_with_a_task_column(tmp_path):
    sft_class()
    data = texts(["a", "b", "c", "a", "b", "c", "a", "b"])
    check_resumed(*resume_run(lambda model, out, **kw: sft(model, out, data, **kw), tmp_path))


@pytest.mark.parametrize("task", ["a", "b"])
def test_sft_with_one_task_leaves_the_other_tasks_unchanged(tmp_path, task):
    sft_class()
    model = adapted()
    before = {t: group(model, t) for t in TASKS}
    sft(model, tmp_path, texts([task] * 8), sgd=True, max_steps=2, save_strategy="no", lr_scheduler_type="constant",
        warmup_steps=0, max_grad_norm=0.0).train()
    for t in TASKS:
        after = group(model, t)
        same = [torch.equal(after[k], v) for k, v in before[t].items()]
        assert (not any(same)) if t == task else all(same), t


def test_sft_gradient_checkpointing_routes_the_recomputed_forward(tmp_path):
    """SFTConfig turns gradient checkpointing on, which runs each layer's forward again in the backward: that
    forward must be routed as the first was. One SGD step with it ends where one without it does."""
    sft_class()
    data = texts(["a", "b", "c", "b"])
    ends = []
    for checkpointing in (True, False):
        model = adapted()
        sft(model, tmp_path / str(checkpointing), data, sgd=True, max_steps=1, save_strategy="no", bf16=False,
            lr_scheduler_type="constant", warmup_steps=0, gradient_checkpointing=checkpointing).train()
        ends.append(weights(model))
    start = weights(adapted())
    assert all(not torch.equal(ends[0][k], start[k]) for k in start)
    for k in start:
        torch.testing.assert_close(ends[0][k], ends[1][k], atol=1e-6, rtol=1e-5, msg=k)


def test_sft_evaluation_routes_each_sample(tmp_path):
    """SFTTrainer's own prediction step, under the mixin's route: one sample per batch, the eval loss is the mean of
    each (tokenized) sample's loss run alone under use(its task)."""
    sft_class()
    model = adapted()
    trainer = sft(model, tmp_path, texts(["a"]), eval_dataset=texts(MIXED), bf16=False, per_device_eval_batch_size=1)
    prepared = list(trainer.eval_dataset)
    assert [s["task"] for s in prepared] == MIXED
    loss = trainer.evaluate()["eval_loss"]
    model.eval()
    with torch.no_grad():
        assert loss == pytest.approx(each_alone(model, prepared).item(), rel=1e-5)


# ---- refusals --------------------------------------------------------------------------------------------------


def listing(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_unknown_tasks_in_a_dataset_are_refused_before_anything_is_made(tmp_path):
    data = dataset(["a", "x", "b", "y", "x"])
    with pytest.raises(TaskError, match=r"the column 'task' names tasks this adaptation does not have: 'x', 'y'; "
                                        r"its tasks are 'a', 'b', 'c' \(a sample's task is one of these names or its "
                                        r"index 0-2; None or -1"):
        AdapterTrainer(adapted(), arguments(tmp_path / "out"), train_dataset=data, task_column="task")
    with pytest.raises(TaskError, match=r"does not have: (7, -2|-2, 7); its tasks"):  # indices out of range
        AdapterTrainer(adapted(), arguments(tmp_path / "out"), train_dataset=dataset([0, 7, -2, 2]),
                       task_column="task")
    with pytest.raises(TaskError, match="does not have: 'z'"):
        AdapterTrainer(adapted(), arguments(tmp_path / "out"), train_dataset=dataset(MIXED),
                       eval_dataset={"one": dataset(["a", "z"])}, task_column="task")
    assert listing(tmp_path) == []


def test_unknown_tasks_in_other_datasets_are_refused_at_their_batch(tmp_path):
    trainer = AdapterTrainer(adapted(), arguments(tmp_path), train_dataset=rows(["a", "b", "q", "a", "b", "a"]),
                             task_column="task")
    with pytest.raises(TaskError, match="does not have: 'q'; its tasks are 'a', 'b', 'c'"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_a_missing_column_is_refused(tmp_path):
    data = Dataset.from_list([{k: v for k, v in r.items() if k != "task"} for r in rows(MIXED)])
    with pytest.raises(ConfigError, match=r"task_column='task', but the train dataset has no such column; its "
                                          r"columns: 'input_ids', 'labels'"):
        AdapterTrainer(adapted(), arguments(tmp_path / "out"), train_dataset=data, task_column="task")
    assert listing(tmp_path) == []
    samples = rows(MIXED)
    del samples[2]["task"]
    trainer = AdapterTrainer(adapted(), arguments(tmp_path), train_dataset=samples, task_column="task")
    with pytest.raises(ConfigError, match="a sample has no such column"):
        trainer.train()
    ids = torch.tensor([samples[0]["input_ids"]])
    with pytest.raises(ConfigError, match="the batch has no such key .*'input_ids', 'labels'"):
        trainer.training_step(trainer.model, {"input_ids": ids, "labels": ids})


def test_an_adaptation_without_tasks_is_refused(tmp_path):
    model = tiny_llama().train()
    attach(model, {"attn": LoRA(4)})
    with pytest.raises(ConfigError, match="task_column='task' routes each sample to its task's components, but the "
                                          "model's adaptation has no tasks"):
        AdapterTrainer(model, arguments(tmp_path / "out"), train_dataset=dataset(MIXED), task_column="task")
    assert listing(tmp_path) == []


@pytest.mark.parametrize("column, fragment", [
    ("", "a non-empty string; got ''"), (3, "a non-empty string; got 3"),
    ("labels", "task_column='labels' is an input of LlamaForCausalLM.forward")])
def test_a_bad_column_name_is_refused(tmp_path, column, fragment):
    with pytest.raises(ConfigError, match=fragment):
        AdapterTrainer(adapted(), arguments(tmp_path / "out"), train_dataset=dataset(MIXED), task_column=column)
    assert listing(tmp_path) == []


@pytest.mark.parametrize("kw, fragment", [({"packing": True}, "packing=True"),
                                          ({"padding_free": True}, "padding_free=True"),
                                          ({"eval_packing": True}, "eval_packing=True")])
def test_sft_packing_and_padding_free_are_refused(tmp_path, kw, fragment):
    sft_class()
    with pytest.raises(ConfigError, match=f"SFT: task_column='task' routes each sample to its task, but {fragment} "
                                          f"puts several samples in one row"):
        sft(adapted(), tmp_path / "out", texts(["a", "b"]), **kw)
    assert listing(tmp_path) == []


def test_the_collator_wrapper_keeps_the_collators_attributes():
    class Inner:
        tokenizer = "tok"

        def __call__(self, features):
            return {"n": torch.tensor([len(f) for f in features])}

    wrapped = TaskColumn(Inner(), "task", ["a", "b"])
    batch = wrapped([{"x": 1, "task": "b"}, {"x": 2, "task": None}, {"x": 3, "task": 0}])
    assert batch["task"].tolist() == [1, -1, 0] and batch["n"].tolist() == [1, 1, 1]
    assert wrapped.tokenizer == "tok"


def test_ddp_may_leave_the_tasks_a_batch_lacks_without_gradient(tmp_path):
    """Under DDP a task that no sample of a rank's batch has gets no gradient there: find_unused_parameters must be
    on (Trainer turns it off under gradient checkpointing). Unset, it is set; set off, it is refused."""
    args = arguments(tmp_path / "out", gradient_checkpointing=True)
    assert args.ddp_find_unused_parameters is None
    AdapterTrainer(adapted(), args, train_dataset=dataset(MIXED), task_column="task")
    assert args.ddp_find_unused_parameters is True
    args = arguments(tmp_path / "out", ddp_find_unused_parameters=False)
    with pytest.raises(ConfigError, match="which DDP allows with ddp_find_unused_parameters=True only; drop "
                                          "ddp_find_unused_parameters=False"):
        AdapterTrainer(adapted(), args, train_dataset=dataset(MIXED), task_column="task")
