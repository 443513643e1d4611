"""One rank of tests/test_multitask_sharded.py: AdapterTrainer(task_column=...) on 2 CPU processes (gloo).

    torchrun --nproc_per_node 2 multitask_worker.py ENGINE OUT

ENGINE: ddp or fsdp2, set up as in trainer_worker.py (a task column is refused under DeepSpeed), with AdapterTrainer;
fsdp2-sft: under FSDP2 with TRL's SFTTrainer and the mixin (SFTConfig's defaults but bf16: gradient checkpointing on),
on texts of one length with the same tasks. A tiny Llama with three tasks (a: LoRA on attn,
b: an Adapter on ffn, c: LoRA on ffn, which no sample names) trains 4 AdamW steps of 2 samples per rank, in order
(no shuffling), so each step's tasks per rank are known: step 0 gives rank 0 task a only and rank 1 task b only,
step 2 has no sample of b on any rank. Rank R writes OUT/rank{R}.pt: the components at the start and gathered whole
at the end, and each step's batch as this rank trained it (input ids, task indices).
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from helpers import VOCAB, perturb, tiny_llama
from torch.utils.data import SequentialSampler
from trainer_worker import cpu_state, whole
from trainer_worker import args as engine_args

from adaptune import Adapter, LoRA, attach
from adaptune.trainer import AdapterTrainer

STEPS = 4
TASKS = {"a": {"attn": LoRA(4)}, "b": {"ffn": Adapter(8)}, "c": {"ffn": LoRA(4)}}
# the task of each sample in order: step s trains samples 4s, 4s+1 on rank 0 and 4s+2, 4s+3 on rank 1
ORDER = ["a", "a", "b", "b",  "a", "b", "a", "b",  "a", "a", "a", "a",  "b", "a", "b", "b"]


def adapted():
    """The same base and components every time, every component off its start (each parameter gets a gradient)."""
    model = tiny_llama(seed=0).train()
    torch.manual_seed(1)
    attach(model, tasks=TASKS)
    perturb(model.adaptune, std=0.05, seed=1)
    return model


def dataset(length: int = 8) -> list[dict]:
    ids = torch.randint(2, VOCAB, (len(ORDER), length), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": row, "labels": row.clone(), "task": task} for row, task in zip(ids, ORDER)]


class Recording:
    """Trains the samples in order and records each step's batch (a mixin before the trainer class)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.batches = []

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    def training_step(self, model, inputs, *a, **kw):
        self.batches.append({k: inputs[k].clone() for k in ("input_ids", "labels", "task")})
        return super().training_step(model, inputs, *a, **kw)


def texts():
    """TRL's kind of dataset: texts of one length (so each rank's mean loss weighs its tokens alike), a task each."""
    from datasets import Dataset
    from test_trl import WORDS
    g = torch.Generator().manual_seed(0)
    rows = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (6,), generator=g)) for _ in ORDER]
    return Dataset.from_dict({"text": rows, "task": ORDER})


def trainer_for(engine: str, out: Path, model):
    """The recording trainer of `engine` on `model`."""
    common = dict(max_steps=STEPS, save_strategy="no", max_grad_norm=0.0, lr_scheduler_type="constant",
                  warmup_steps=0)
    if engine != "fsdp2-sft":
        class Trainer(Recording, AdapterTrainer):
            pass
        return Trainer(model, engine_args(engine, out, **common), train_dataset=dataset(), task_column="task")
    from test_trl import SFT, tokenizer
    from trl import SFTConfig

    class Trainer(Recording, SFT):
        pass
    args = engine_args("fsdp2", out, kind=SFTConfig, bf16=False, max_length=16, **common)
    return Trainer(model, args, train_dataset=texts(), processing_class=tokenizer(), task_column="task")


def main(engine: str, out: str) -> None:
    torch.set_num_threads(1)
    out = Path(out)
    cpu_state(engine.split("-")[0])
    model = adapted()
    res = {"engine": engine, "start": {k: v.clone() for k, v in model.adaptune.state_dict().items()}}
    trainer = trainer_for(engine, out, model)
    trainer.train()
    res.update(rank=trainer.args.process_index, world=trainer.args.world_size, backend=dist.get_backend(),
               engine_seen={"fsdp": trainer.is_fsdp_enabled, "deepspeed": trainer.is_deepspeed_enabled},
               whole=whole(trainer.model), batches=trainer.batches, optim=type(trainer.optimizer).__name__,
               checkpointing=bool(getattr(trainer.args, "gradient_checkpointing", False)))
    torch.save(res, out / f"rank{res['rank']}.pt")
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
