"""One rank of tests/test_trainer_sharded.py: AdapterTrainer on 2 CPU processes (gloo) under one engine.

    torchrun --nproc_per_node 2 trainer_worker.py ENGINE OUT

ENGINE: ddp (Trainer's own DDP), fsdp2 (Accelerate's FSDP2 plugin: TrainingArguments(fsdp=True,
fsdp_config={"version": 2})), zero2 or zero3 (DeepSpeed through TrainingArguments(deepspeed=...)). Three runs of
the tiny Llama with the same data: uninterrupted (OUT/whole), interrupted after its checkpoint at step SAVE_EVERY
(OUT/cut), and resumed from that checkpoint by a new trainer on a new model whose components start elsewhere; then
save_model (OUT/final) and a resume from a checkpoint of another engine (refused). Rank R writes OUT/rank{R}.pt:
the components at the start and gathered whole after each run, how the engine held them, what the refusal said.

Two shims make Accelerate 1.15 run these engines on CPU (on GPUs neither is needed):
- FSDP: Accelerate turns its FSDP plugin on only for GPU-like distributed types (state.py), so the state is made
  with gloo on CPU and then marked MULTI_GPU; FSDP2 itself (fully_shard) runs on CPU with gloo.
- DeepSpeed: without a GPU, TrainingArguments starts Accelerate's state for DeepSpeed without a backend, and
  Accelerate then counts one process on each rank (each would see all the data, and DeepSpeed refuses the batch
  size); the state is made beforehand with backend="gloo". DeepSpeed picks its CPU accelerator, whose
  communication backend is gloo, and needs no compiled op for ZeRO-1/2/3 with torch's AdamW.
"""
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from helpers import VOCAB, StopAt, caught, tiny_llama
from transformers import TrainingArguments

from adaptune import Adapter, LoRA, attach
from adaptune.errors import AdaptuneError
from adaptune.trainer import AdapterTrainer, zero3_gathered

STEPS, SAVE_EVERY = 4, 2
ENGINES = ("ddp", "fsdp2", "zero2", "zero3")


def spec():
    return {"attn": LoRA(4, dropout=0.1), "ffn": Adapter(8)}  # dropout: the RNG state must come back too


def adapted(seed: int):
    """The same base every time; components drawn with `seed`."""
    model = tiny_llama(seed=0).train()
    torch.manual_seed(seed)
    attach(model, spec())
    return model


def dataset(n: int = 32, length: int = 8) -> list[dict]:
    ids = torch.randint(2, VOCAB, (n, length), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def deepspeed_config(stage: int) -> dict:
    zero = {"stage": stage}
    if stage == 3:  # ZeRO-3 keeps parameters under 1e5 elements whole on every rank; 0 partitions the tiny components
        zero["stage3_param_persistence_threshold"] = 0
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto", "gradient_clipping": "auto", "zero_optimization": zero}


def cpu_state(engine: str) -> None:
    """Accelerate's state for a new trainer under `engine` on CPU (see the module doc). Accelerate takes one
    DeepSpeed accelerator per process, and a resumed run is a new process in practice: its state is cleared before
    each trainer but the first (the process group stays)."""
    from accelerate import PartialState
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType
    AcceleratorState._reset_state()
    if engine == "fsdp2":
        state = PartialState(cpu=True, backend="gloo")
        state.distributed_type = DistributedType.MULTI_GPU  # Accelerate enables FSDP for GPU-like types only
    elif engine.startswith("zero"):
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")
        del os.environ["ACCELERATE_USE_DEEPSPEED"]


def args(engine: str, out: Path, kind: type = TrainingArguments, **extra) -> TrainingArguments:
    """The training arguments (of class `kind`: TRL's SFTConfig too) of a run under `engine` (`extra` replaces or
    adds arguments)."""
    kw = {"use_cpu": True}
    if engine == "fsdp2":
        kw.update(fsdp=True, fsdp_config={"version": 2}, accelerator_config={"use_configured_state": True})
    elif engine.startswith("zero"):
        kw = {"deepspeed": deepspeed_config(int(engine[-1])), "accelerator_config": {"use_configured_state": True}}
    kw = {"max_steps": STEPS, "save_steps": SAVE_EVERY, "per_device_train_batch_size": 2, "learning_rate": 1e-2,
          "warmup_steps": 1, "seed": 0, "report_to": [], "disable_tqdm": True, "dataloader_num_workers": 0,
          "logging_strategy": "no", **kw, **extra}
    return kind(str(out), **kw)


def whole(model) -> dict[str, torch.Tensor]:
    """The components gathered whole on every rank (a collective under FSDP2 and ZeRO-3)."""
    adaptation = model.adaptune
    with zero3_gathered(adaptation):
        return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                for k, v in adaptation.state_dict().items()}


def held(model) -> str:
    """How the engine holds the components between steps."""
    params = list(model.adaptune.parameters())
    if all(type(p).__name__ == "DTensor" for p in params):
        return "DTensor"
    if all(hasattr(p, "ds_id") and p.numel() == 0 for p in params):
        return "partitioned"
    return "whole" if all(p.numel() > 0 for p in params) else "mixed"


def other_engines_checkpoint(engine: str, out: Path, rank: int) -> Path:
    """A checkpoint as another engine writes it: this run's adapters and that engine's optimizer state (a stand-in)."""
    fake = out / "other" / f"checkpoint-{SAVE_EVERY}"
    if rank == 0:
        fake.mkdir(parents=True)
        shutil.copy(out / "cut" / f"checkpoint-{SAVE_EVERY}" / "adapters.safetensors", fake)
        if engine == "fsdp2":
            (fake / f"global_step{SAVE_EVERY}").mkdir()
        else:
            (fake / ("optimizer.bin" if engine == "ddp" else "optimizer.pt")).write_bytes(b"")
    dist.barrier()
    return fake


def main(engine: str, out: str) -> None:
    torch.set_num_threads(1)
    out, data = Path(out), dataset()
    cpu_state(engine)
    res = {"engine": engine}
    model = adapted(seed=1)
    res["start"] = {k: v.clone() for k, v in model.adaptune.state_dict().items()}
    trainer = AdapterTrainer(model, args(engine, out / "whole"), train_dataset=data)
    res["engine_seen"] = {"fsdp": trainer.is_fsdp_enabled, "deepspeed": trainer.is_deepspeed_enabled}
    trainer.train()
    rank, world = trainer.args.process_index, trainer.args.world_size
    res.update(rank=rank, world=world, backend=dist.get_backend(), whole=whole(trainer.model),
               held=held(trainer.model))
    model = adapted(seed=1)
    cpu_state(engine)
    cut = AdapterTrainer(model, args(engine, out / "cut"), train_dataset=data, callbacks=[StopAt(SAVE_EVERY)])
    cut.train()
    res["cut"] = whole(cut.model)  # the components at the checkpoint
    model = adapted(seed=2)  # other initial components: the checkpoint must overwrite them
    res["resumed_start"] = {k: v.clone() for k, v in model.adaptune.state_dict().items()}
    cpu_state(engine)
    resumed = AdapterTrainer(model, args(engine, out / "cut"), train_dataset=data)
    resumed.train(resume_from_checkpoint=str(out / "cut" / f"checkpoint-{SAVE_EVERY}"))
    res["resumed"], res["steps"] = whole(resumed.model), resumed.state.global_step
    resumed.save_model(str(out / "final"))  # on every rank
    dist.barrier()
    other = other_engines_checkpoint(engine, out, rank)
    res["other"] = caught(lambda: resumed.train(resume_from_checkpoint=str(other)), AdaptuneError)
    res["after_refusal"] = whole(resumed.model)  # nothing ran, and the ranks are still together
    torch.save(res, out / f"rank{rank}.pt")
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
